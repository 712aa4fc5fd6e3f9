"""scripts/benchmark_pipelines.py on the tiny default: its JSON and chart are complete and sane.

No speed is asserted here: the benchmark prints speeds, tests check that they are measured.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipelines.contenders import CONTENDERS
from utils.benchmark import STAGES

pytestmark = pytest.mark.server  # starts tritonserver

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_writes_complete_results(tiny_model, tmp_path):
    command = [sys.executable, str(ROOT / "scripts/benchmark_pipelines.py"), "--model", str(tiny_model),
               "--warmup", "1", "--runs", "2", "--num-inference-steps", "5", "--concurrency", "1", "2", "--requests", "2",
               "--pipelines", "diffusers", "diffusers-fast", "triton-client-side", "triton-bls", "triton-ensemble",
               "--time-restart", "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (json_path,) = (tmp_path / "out").glob("*.json")
    (png_path,) = (tmp_path / "out").glob("*.png")
    assert str(json_path) in result.stdout and str(png_path) in result.stdout  # the table is printed too
    measured = {"diffusers", "diffusers-fast", "triton-client-side", "triton-bls", "triton-ensemble"}
    assert all(name in result.stdout for name in measured)
    assert "nan" not in result.stdout.replace("nanoseconds", "")

    results = json.loads(json_path.read_text())
    assert results["failed"] == {}
    assert set(results["pipelines"]) == measured
    assert set(results["concurrency"]) == {name for name in measured if CONTENDERS[name].served}
    assert results["settings"]["steps"] == 5 and results["settings"]["resolution"] == [64, 64]
    assert results["environment"]["versions"]["tritonserver"] == "2.51.0"
    server = results["server"]  # the start this script made, and --time-restart's restart
    assert 0 < server["start_s"] < 600 and 0 < server["restart_s"] < 600, server
    (restart,) = server["restarts"]
    assert 0 < restart["stop_s"] < restart["total_s"] == server["restart_s"], restart
    assert (f"restarted (stop, start with the compile cache) in {restart['total_s']:.0f} s "
            f"(stop {restart['stop_s']:.0f} s)") in result.stdout
    # Each contender's configuration, in one line of the table and in the JSON.
    for name in measured:
        assert f"  {name}: {results['pipelines'][name]['configuration']}" in result.stdout
    assert "fused QKV, channels_last UNet and VAE" in results["pipelines"]["diffusers-fast"]["configuration"]
    assert "--pipeline-loop cpu" in results["pipelines"]["triton-bls"]["configuration"]
    # diffusers-fast's 2 images in one call (the highest concurrency): the bound for 2 clients.
    assert results["settings"]["static_batches"] == [2] and set(results["static_batch"]) == {"diffusers-fast"}
    bound = results["static_batch"]["diffusers-fast"]["2"]
    assert bound["images"] == 2 and len(bound["latency"]["raw_s"]) == 3 and bound["throughput_images_per_s"] > 0
    assert f"bound: diffusers-fast, 2 images in one call: {bound['throughput_images_per_s']:.2f} img/s" in result.stdout
    # The loop calls the served UNet through Triton (the loop on the CPU): one step, split.
    for name in ("triton-bls", "triton-ensemble"):
        step = results["pipelines"][name]["stages"]["per_step_ms"]
        assert step["steps_per_run"] == 6 and step["unet_model_execute"] > 0 and step["loop_python_and_scheduler"] > 0
        assert step["unet_call_as_the_loop_sees_it"] > step["unet_model_execute"] + step["queue"], step
        assert f"{name}: one denoising step, 6 per image, in ms" in result.stdout
    for name, figures in results["pipelines"].items():
        latency, stages = figures["latency"], figures["stages"]
        assert len(latency["raw_s"]) == 2
        for key in ("mean_s", "p50_s", "p90_s", "p99_s", "images_per_s", "raw_s"):
            values = latency[key] if isinstance(latency[key], list) else [latency[key]]
            assert all(math.isfinite(v) and v > 0 for v in values), (name, key, values)
        for stage in (*STAGES, "unet_per_call", "end_to_end"):
            assert math.isfinite(stages[stage]) and stages[stage] > 0, (name, stage, stages)
        assert stages["unet_calls_per_run"] == 6  # PNDM: 5 steps = 6 UNet calls
        # Stages add up to no more than the end-to-end time of the runs they were measured in
        # (the measured runs for the served pipelines; extra timed runs for diffusers). Triton's
        # figures come from the server's clock, the end-to-end time from the client's: on a busy
        # 2-core machine they can disagree by a fraction of a percent (seen: 0.4 %).
        assert sum(stages[stage] for stage in STAGES) <= 1.01 * stages["end_to_end"], (name, stages)
        if CONTENDERS[name].served:
            assert stages["end_to_end"] == latency["mean_s"]
        assert stages["other"] >= 0
        budget = results["compute_budget"][name]  # the networks' compute, against the measured time
        assert 0 < budget["ideal_s"] <= 1.01 * budget["measured_s"] and budget["overhead_fraction"] < 1
    for name, runs in results["concurrency"].items():
        assert set(runs) == {"1", "2"}
        for run in runs.values():
            assert run["errors"] == 0 and run["requests"] == 2, run
            assert math.isfinite(run["throughput_images_per_s"]) and run["throughput_images_per_s"] > 0
            # From Triton's per-batch statistics: the CPU runtime does not batch across requests,
            # so each UNet call is one request's 2 rows (guidance), and it computes part of the time.
            unet = run["unet"]
            assert unet["executions"] == 2 * 6 and unet["mean_batch"] == 2, unet
            assert 0 < unet["busy_fraction"] <= 1 and unet["ms_per_execution"] > 0, unet
    for name, entry in results["fidelity"].items():  # the same seed: the same image, to rounding
        assert entry["finite_and_not_constant"]
        if name != "diffusers":
            assert entry["reference"] == "diffusers"
            assert entry["max_pixel_difference"] <= 2
            assert entry["psnr_db_vs_diffusers"] is None or entry["psnr_db_vs_diffusers"] > 40

    with Image.open(png_path) as chart:
        assert chart.width > 1000 and chart.height > 300


IMAGE_TASKS = {  # task: (its arguments, the strength run, the UNet calls of each run)
    # PNDM: 5 steps are 6 UNet calls; strength 0.6 keeps int(5 x 0.6) = 3 steps, the last 4 calls.
    "image-to-image": (["--strength", "0.6"], 0.6, 4),
    "inpaint": ([], 1.0, 6),  # inpainting's default strength, as diffusers': every step
}


def run_benchmark(arguments: list[str], tmp_path: Path) -> tuple[str, dict]:
    """scripts/benchmark_pipelines.py with these arguments, its results in tmp_path/out: what it
    printed, and its JSON."""
    command = [sys.executable, str(ROOT / "scripts/benchmark_pipelines.py"), *arguments,
               "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    (json_path,) = (tmp_path / "out").glob("*.json")
    return result.stdout, json.loads(json_path.read_text())


@pytest.mark.parametrize("task", IMAGE_TASKS)
def test_image_benchmarks_against_a_running_server(task, triton_server, tiny_model, tmp_path):
    """--url: the session's server (no start of its own); --task image-to-image: every pipeline
    from the same picture, the VAE encoder among the stages, the same images as diffusers'; --task
    inpaint: the same picture with its middle repainted, the same images as diffusers' inpainting."""
    arguments, strength, unet_calls = IMAGE_TASKS[task]
    printed, results = run_benchmark([
        "--model", str(tiny_model), "--url", triton_server.grpc_url, "--admin-key", triton_server.admin_key,
        "--task", task, *arguments, "--warmup", "1", "--runs", "2", "--num-inference-steps", "5",
        "--pipelines", "diffusers", "triton-client-side", "triton-bls", "triton-ensemble", "--min-psnr", "40"], tmp_path)
    assert results["settings"]["task"] == task and results["settings"]["strength"] == strength
    assert "vae enc" in printed and "fidelity check passed" in printed
    for name, figures in results["pipelines"].items():
        stages = figures["stages"]
        assert stages["vae_encoder"] > 0 and stages["unet_calls_per_run"] == unet_calls, (name, stages)


def test_a_benchmark_of_adapters_requested_in_turn_with_few_step_sampling(triton_server, tiny_model, adapters,
                                                                         tmp_path):
    """--alternate-lora: the requests ask for the session's two adapters in turn, diffusers
    switching them with set_adapters; LCM, 4 steps, guidance 1 (LCM-LoRA's use). Every way's last
    image (the second adapter's) equals diffusers'; diffusers-fast's bound makes one call per adapter."""
    printed, results = run_benchmark([
        "--model", str(tiny_model), "--url", triton_server.grpc_url, "--admin-key", triton_server.admin_key,
        *[f"--lora={adapter.name}={adapter.path}" for adapter in adapters],
        "--alternate-lora", *[adapter.name for adapter in adapters],
        "--scheduler", "LCMScheduler", "--num-inference-steps", "4", "--guidance-scale", "1",
        "--warmup", "1", "--runs", "2", "--concurrency", "2", "--requests", "4",
        "--pipelines", "diffusers", "diffusers-fast", "triton-client-side", "triton-bls", "triton-ensemble",
        "--min-psnr", "40"], tmp_path)
    names = [adapter.name for adapter in adapters]
    assert results["failed"] == {}
    assert results["settings"]["lora"] == names and results["settings"]["scheduler"] == "LCMScheduler"
    assert f"4 steps of LCMScheduler, guidance 1.0, the requests asking for LoRA {' and '.join(names)} in turn" \
        in printed
    assert "fidelity check passed" in printed
    for name in ("diffusers", "diffusers-fast"):
        configuration = results["pipelines"][name]["configuration"]
        assert f"LoRA {' and '.join(names)} chosen per request with set_adapters" in configuration
    assert "QKV not fused" in results["pipelines"]["diffusers-fast"]["configuration"]
    for name, figures in results["pipelines"].items():
        assert figures["stages"]["unet_calls_per_run"] == 4, name  # guidance 1: one UNet call per step
        if name != "diffusers":
            assert results["fidelity"][name]["max_pixel_difference"] <= 2, (name, results["fidelity"][name])
    for name, runs in results["concurrency"].items():
        assert runs["2"]["errors"] == 0, (name, runs["2"]["error_messages"])
    bound = results["static_batch"]["diffusers-fast"]["2"]  # one image of each adapter: two calls
    assert bound["images"] == 2 and bound["throughput_images_per_s"] > 0


def test_the_openai_gateway_is_measured_in_front_of_bls(triton_server, tiny_model, tmp_path):
    """--pipelines openai-gateway: OpenAI's images API in front of the BLS pipeline, called with the
    openai SDK, measured alone and under load beside BLS called directly; the same image as diffusers'."""
    printed, results = run_benchmark([
        "--model", str(tiny_model), "--url", triton_server.grpc_url, "--admin-key", triton_server.admin_key,
        "--warmup", "1", "--runs", "2", "--num-inference-steps", "3", "--concurrency", "2", "--requests", "4",
        "--pipelines", "diffusers", "triton-bls", "openai-gateway", "--min-psnr", "40"], tmp_path)
    assert results["failed"] == {} and "fidelity check passed" in printed
    gateway = results["pipelines"]["openai-gateway"]
    assert "OpenAI's images API" in gateway["configuration"] and gateway["latency"]["mean_s"] > 0
    assert results["fidelity"]["openai-gateway"]["max_pixel_difference"] <= 2
    # The gateway's requests are BLS requests to the server: the same stages, one more hop.
    bls = results["pipelines"]["triton-bls"]
    assert gateway["stages"]["unet_calls_per_run"] == bls["stages"]["unet_calls_per_run"]
    run = results["concurrency"]["openai-gateway"]["2"]
    assert run["errors"] == 0 and run["throughput_images_per_s"] > 0
