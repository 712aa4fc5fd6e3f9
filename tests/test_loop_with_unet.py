"""``--pipeline-loop with-unet`` on the real server: each model that runs the loop holds a UNet of
its own and batches the steps of its requests in flight (here the torch runtime on the CPU; the
CUDA graphs around the same UNet are exercised by scripts/gpu_host/benchmark.sh).

Images still equal diffusers', through BLS, the ensemble and the stream; concurrent requests run
at once in one process and their steps meet in one UNet call; no step goes through the served
UNet; a client's time-out still stops the loop.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import profiled_server, report
from test_end_to_end import MAX_PIXEL_DIFFERENCE, diffusers_images, diffusers_pipeline  # noqa: F401 (fixture)
from test_lora import diffusers_lora_images, diffusers_with_adapters  # noqa: F401 (fixture)
from test_metrics import scrape, value
from test_reliability import unet_executions
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from pipelines.ensemble import EnsemblePipeline
from pipelines.streaming import StreamingPipeline
from utils import metrics

pytestmark = pytest.mark.server  # starts tritonserver

LOOPS_IN_FLIGHT = 4
OPTIONS = dict(prompt=["a red cube", "a blue sphere"], negative_prompt=["blurry", "low quality"], seed=123,
               num_inference_steps=12, guidance_scale=5.0)


def server_deployment():
    from utils.deployment import Deployment, Placement

    return Deployment(runtime="torch", placement=Placement(pipeline_loop="with-unet", pipeline_instances=LOOPS_IN_FLIGHT))


@pytest.fixture(scope="module")
def server(tiny_model, in_place_adapters, models_dir, tmp_path_factory):
    """Its models log their split, with the in-process UNet's batches; it serves LoRA adapters."""
    from dataclasses import replace

    from utils.repository.writer import write_repository

    from utils.controlnet import ServedControlNet

    repository = tmp_path_factory.mktemp("loop-with-unet")
    write_repository(repository, tiny_model, None, replace(server_deployment(), adapters=in_place_adapters, controlnets=(
        ServedControlNet(CONTROLNET, "tiny"),)), models_dir=models_dir)
    with profiled_server(repository) as server:
        yield server


CONTROLNET = "edges"  # a ControlNet served beside the loop's UNet: its requests' steps go to controlled_unet


def test_a_controlnet_request_beside_plain_ones_equals_diffusers(server, tiny_model, models_dir):
    """Its controlled steps go to controlled_unet by BLS, its plain ones (none here) to the loop's
    UNet, its loop outside the batcher's count: in flight with plain requests, each gives its image."""
    from concurrent.futures import ThreadPoolExecutor

    from test_controlnet import diffusers_controlnet, photo

    from utils.controlnet import ServedControlNet, canny, controlnet_folder

    control = dict(prompt="a castle", seed=3, num_inference_steps=8, control_image=canny(photo()))
    folder = controlnet_folder(ServedControlNet(CONTROLNET, "tiny"), tiny_model, models_dir)
    pipeline = BlsPipeline(server.grpc_url)
    with ThreadPoolExecutor(3) as pool:
        guided = pool.submit(pipeline, **control)
        plain = [pool.submit(pipeline, **OPTIONS) for _ in range(2)]
        images, plain_images = guided.result(), [future.result() for future in plain]
    control_image = control.pop("control_image")
    pixels = difference(images, diffusers_controlnet(tiny_model, [folder], control_image, **control))
    report(f"loop with the UNet, a ControlNet request beside plain ones vs diffusers: max pixel difference {pixels}")
    assert pixels <= MAX_PIXEL_DIFFERENCE
    assert all(np.array_equal(plain_images[0], other) for other in plain_images[1:])


def difference(images: np.ndarray, expected: np.ndarray) -> int:
    assert images.shape == expected.shape
    return int(np.abs(images.astype(int) - expected.astype(int)).max())


def test_bls_ensemble_and_stream_equal_diffusers_without_the_served_unet(server, diffusers_pipeline):
    expected = diffusers_images(diffusers_pipeline, **OPTIONS)
    before = unet_executions(server)
    for name, pipeline in (("BLS", BlsPipeline(server.grpc_url)), ("ensemble", EnsemblePipeline(server.grpc_url)),
                           ("stream", StreamingPipeline(server.grpc_url))):
        pixels = difference(pipeline(**OPTIONS), expected)
        report(f"loop with the UNet, {name} vs diffusers: max pixel difference {pixels}")
        assert pixels <= MAX_PIXEL_DIFFERENCE
    assert unet_executions(server) == before  # every step ran in the loop's own process


def unet_batches_so_far(server) -> tuple[int, float]:
    """The BLS model's in-process UNet calls and rows since the start, from its last profile line:
    "...; UNet in process so far: N calls, M rows (R per call)"."""
    lines = [line for line in server.log_file.read_text().splitlines()
             if "pipeline_text_to_image: " in line and "UNet in process so far" in line]
    if not lines:
        return 0, 0
    calls, rows = re.search(r"so far: (\d+) calls, (\d+) rows", lines[-1]).groups()
    return int(calls), int(rows)


def test_concurrent_requests_run_at_once_and_their_steps_share_unet_calls(server, diffusers_pipeline):
    seeds = range(40, 40 + LOOPS_IN_FLIGHT)
    options = dict(prompt="a lighthouse at dusk", num_inference_steps=20)
    calls_before, rows_before = unet_batches_so_far(server)
    computed_before = metrics.total(metrics.scrape(server.metrics_url), metrics.UNET_IN_PROCESS_SECONDS)
    with ThreadPoolExecutor(LOOPS_IN_FLIGHT) as threads:
        results = list(threads.map(lambda seed: BlsPipeline(server.grpc_url)(seed=seed, **options), seeds))
    for seed, images in zip(seeds, results, strict=True):
        assert difference(images, diffusers_images(diffusers_pipeline, seed=seed, **options)) <= MAX_PIXEL_DIFFERENCE
    calls, rows = unet_batches_so_far(server)
    calls, rows = calls - calls_before, rows - rows_before
    # Its compute, which Triton's statistics do not see, is on the metrics port (the dashboard's panel).
    computed = metrics.total(metrics.scrape(server.metrics_url), metrics.UNET_IN_PROCESS_SECONDS)
    assert computed > computed_before, (computed_before, computed)
    last = [line for line in server.log_file.read_text().splitlines() if "UNet in process so far" in line][-1]
    assert re.search(r"[\d.]+ ms per call on the CPU, busy \d+ % since the last report", last), last  # its compute
    report(f"loop with the UNet, {LOOPS_IN_FLIGHT} concurrent requests of 21 steps: {calls} UNet calls of "
           f"{rows / calls:.1f} rows on average")
    assert rows == LOOPS_IN_FLIGHT * 21 * 2  # every step ran, 2 rows each (guidance)
    assert calls < LOOPS_IN_FLIGHT * 21  # so steps of several requests shared calls


def test_a_client_timeout_stops_the_loop(server):
    with pytest.raises(InferenceServerException, match="Deadline Exceeded"):
        BlsPipeline(server.grpc_url, timeout=0.5, retry_for=0)(prompt="a long request", num_inference_steps=999,
                                                               seed=5)
    time.sleep(0.3)  # the step running when the deadline passed finishes

    def steps() -> float:
        return value(scrape(server), metrics.STEPS.name, model="pipeline_text_to_image")

    before = steps()
    time.sleep(1.5)  # hundreds of steps if the loop kept going
    after = steps()
    report(f"loop with the UNet: steps in the 1.5 s after a client timeout: {after - before:.0f}")
    assert after - before <= 2
    assert BlsPipeline(server.grpc_url)(prompt="still serving", num_inference_steps=2, seed=1).shape[0] == 1


def test_the_benchmark_reads_the_in_process_unets_compute_from_the_metrics_or_says_it_cannot(server, tiny_model):
    """Triton's statistics do not see an in-process UNet. With the server's metrics address the
    benchmark reads its compute from sd_unet_in_process_seconds_total and budgets the pipeline as
    any other; without it, it marks the UNet `in loop` and gives no budget rather than one without
    the UNet."""
    from pipelines.contenders import CONTENDERS
    from utils.benchmark.measure import run_benchmark
    from utils.benchmark.report import IN_LOOP, table
    from utils.benchmark.settings import Settings

    settings = Settings(steps=4, warmup=1, runs=2, concurrency=(2,), requests=2, deployment=server_deployment())
    contenders = {name: CONTENDERS[name] for name in ("triton-client-side", "triton-bls")}
    results = run_benchmark(settings, tiny_model, server.grpc_url, contenders, headers=server.admin_headers())
    assert results["failed"] == {}
    assert results["pipelines"]["triton-bls"]["stages"]["unet_in_loop"]
    assert not results["pipelines"]["triton-client-side"]["stages"]["unet_in_loop"]  # it calls the served UNet
    assert set(results["compute_budget"]) == {"triton-client-side"}
    text = table(results)
    bls_row = next(line for line in text.splitlines() if line.startswith("triton-bls") and "│" in line)
    assert "in loop" in bls_row
    assert f"triton-bls           none: {IN_LOOP}" in text

    results = run_benchmark(settings, tiny_model, server.grpc_url, {"triton-bls": CONTENDERS["triton-bls"]},
                            headers=server.admin_headers(), metrics_url=server.metrics_url)
    stages, budget = results["pipelines"]["triton-bls"]["stages"], results["compute_budget"]["triton-bls"]
    assert stages["unet_in_loop"] and 0 < stages["unet"] < stages["end_to_end"], stages
    assert stages["unet"] <= budget["ideal_s"] <= budget["measured_s"], budget
    # Its calls and rows too: the compute per call, and under load how full its batches were.
    assert 0 < stages["unet_per_call"] < stages["unet"] and stages["unet_rows_per_call"] == 2, stages
    text = table(results)
    bls_row = next(line for line in text.splitlines() if line.startswith("triton-bls") and "│" in line)
    assert f"{stages['unet']:>8.3f} {1000 * stages['unet_per_call']:>6.2f} ms" in bls_row
    (loaded,) = results["concurrency"]["triton-bls"].values()
    unet = loaded["unet"]
    assert unet["source"].startswith("the pipeline's metrics") and 2 <= unet["mean_batch"] <= 4, unet
    # 2 requests of 5 UNet calls, 2 rows each (guidance): every row ran, in batches they shared.
    assert unet["executions"] * unet["mean_batch"] == 2 * 5 * 2 and 0 < unet["busy_fraction"] <= 1, unet
    loaded_row = next(line for line in text.splitlines() if line.startswith("triton-bls") and " 2 " in line
                      and line.count("│") == 1 and "ms" not in line)
    assert f"{unet['mean_batch']:>10.1f}" in loaded_row and "-" not in loaded_row.split("│")[1], loaded_row


def test_lora_adapters_are_applied_in_the_loops_own_unet(server, diffusers_with_adapters):
    """The loop's own UNet applies a request's adapters in place, as the served one does: a mix
    equals diffusers, requests of different adapters at once each get their own image (their steps
    run in batches of their own), and no step goes through the served UNet."""
    before = unet_executions(server)
    requests = [dict(prompt="a harbour", seed=25 + i, num_inference_steps=6, lora=lora, lora_scale=scale)
                for i, (lora, scale) in enumerate([(["style", "lcm"], [0.7, 0.5]), (["lcm"], None), ([], None),
                                                   (["words", "style"], [1.0, 1.5])])]
    expected = [diffusers_lora_images(diffusers_with_adapters, r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as threads:
        together = list(threads.map(lambda r: BlsPipeline(server.grpc_url)(**r), requests))
    pixels = [difference(images, reference) for images, reference in zip(together, expected, strict=True)]
    report(f"loop with the UNet, LoRA in place, 4 concurrent requests of different adapters vs diffusers: max pixel "
           f"difference {max(pixels)}")
    assert max(pixels) <= MAX_PIXEL_DIFFERENCE
    assert unet_executions(server) == before  # every step in the loop's own process
