"""perf_analyzer (``make tools``) on the project's models: the command lines and input file built
from the specs (no server), then a few seconds of real load on the session's server, a network at
batch 2 and the BLS pipeline at 2 steps, with what perf_analyzer reports checked against the
server's own statistics, and the script's one-line errors."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from conftest import report
from google.protobuf import json_format

from utils import specs
from utils.operations import perf_analyzer
from utils.repository.configs import network_config
from utils.deployment import Deployment
from utils.errors import UsageError
from utils.grpc_client import connect
from utils.server.health import served_shapes
from utils.layout import PROJECT_ROOT
from utils.operations.perf_analyzer import Load
from utils.request import GenerationRequest
from utils.server import free_port
from utils.server.access import AccessPolicy

SCRIPT = PROJECT_ROOT / "scripts" / "run_perf_analyzer.py"
URL = "127.0.0.1:8001"
SD15 = specs.ModelDims(text_length=77, text_hidden=768, latent_channels=4, latent_height=64, latent_width=64,
                       vae_scale_factor=8)
REQUESTS = 20  # per run: about a second of load on 2 cores, enough for percentiles


def served_config(network: specs.NetworkSpec, dims: specs.ModelDims) -> dict:
    """A network's config as the server answers it in JSON (int64 fields as strings)."""
    config = network_config(network, dims, "FP32", Deployment())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def test_network_command_sends_every_input_at_its_served_size():
    config = served_config(specs.UNET, SD15)  # latents open (-1): the warm-up's size, SD1.5's 64x64
    assert perf_analyzer.network_arguments(config, 2, URL, Load()) == [
        "-m", specs.UNET.name, "-b", "2", "--shape", "sample:4,64,64", "--shape", "timestep:1",
        "--shape", "encoder_hidden_states:77,768", "-u", URL, "-i", "grpc",
        "--concurrency-range", "1:1:1", "--measurement-interval", "3000", "--stability-percentage", "20"]
    with pytest.raises(UsageError, match=f"--batch 17: unet takes 1 to {specs.UNET.profile.max} rows"):
        perf_analyzer.network_arguments(config, 17, URL, Load())


def test_pipeline_command_and_its_input_data(tmp_path):
    request = GenerationRequest(prompt=["a red fox"], num_inference_steps=2, seed=7)
    one = {"shape": [1]}
    assert perf_analyzer.pipeline_input_data(request) == {"data": [{
        specs.PROMPT.name: {"content": ["a red fox"], **one},
        specs.NUM_IMAGES_PER_PROMPT.name: {"content": [1], **one},  # (no guidance_scale: the served family's)
        specs.NUM_INFERENCE_STEPS.name: {"content": [2], **one},
        specs.SEED.name: {"content": [7], **one},
    }]}
    input_data = perf_analyzer.write_input_data(tmp_path / "input.json", request)
    load = Load(concurrency=(2, 2, 1), requests=10)
    headers = AccessPolicy(admin_key="secret").headers()
    (header,) = headers
    arguments = perf_analyzer.pipeline_arguments(specs.TEXT_TO_IMAGE, input_data, URL, load, headers)
    assert arguments == [
        "-m", specs.TEXT_TO_IMAGE.name, "--input-data", str(input_data),
        "--bls-composing-models", ",".join(network.name for network in specs.TEXT_TO_IMAGE.networks),
        "-u", URL, "-i", "grpc", "-H", f"{header}:secret",
        "--concurrency-range", "2:2:1", "--request-count", "10"]
    assert "secret" not in perf_analyzer.printable(arguments, headers)


@pytest.mark.parametrize("concurrency, requests, message", [
    ("1:x", 0, "--concurrency '1:x': give START"),
    ("3:1", 0, "--concurrency 3:1:1: give START"),
    ("1:4", 10, "a request count applies to one concurrency"),
])
def test_load_refuses_what_perf_analyzer_cannot_run(concurrency, requests, message):
    with pytest.raises(UsageError, match=message):
        Load(perf_analyzer.parse_concurrency(concurrency), requests=requests)


# A real run's report (the BLS pipeline, 2 steps, 20 requests; trimmed to what is parsed).
CSV = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,\
request/response,response wait
1,19.9851,8,552,39,25,17838,361,3,15793,22671,25290,55383,18828,11,18786
"""
SUMMARY = """Request concurrency: 1
  Client:
    Request count: 20
    Throughput: 19.9851 infer/sec
  Server:
    Inference count: 20
    Execution count: 20
    Avg request latency: 18266 usec (overhead 9980 usec + queue 96 usec + compute 8190 usec)

  Composing models:
  unet, version: 1
      Inference count: 120
      Execution count: 60
      Successful request count: 60
      Avg request latency: 2355 usec (overhead 3 usec + queue 48 usec + compute input 15 usec + \
compute infer 2194 usec + compute output 94 usec)
"""


def test_parse_results():
    (result,) = perf_analyzer.parse_results(CSV, SUMMARY)
    assert (result.concurrency, result.requests, result.throughput) == (1, 20, 19.9851)
    assert (result.p50_s, result.p99_s, result.mean_s) == pytest.approx((0.015793, 0.055383, 0.018828))
    assert result.server_compute_s == pytest.approx((25 + 17838 + 361) * 1e-6)
    (unet,) = result.composing
    assert (unet.name, unet.executions, unet.inferences) == (specs.UNET.name, 60, 120)
    assert (unet.latency_s, unet.queue_s, unet.compute_infer_s) == pytest.approx((2355e-6, 48e-6, 2194e-6))


def test_table_shows_the_models_own_times_and_a_pipelines_networks():
    (result,) = perf_analyzer.parse_results(CSV, SUMMARY)
    pipeline = perf_analyzer.table([result]).splitlines()
    assert pipeline[1].split() == ["1", "20", "19.99", "18.8", "15.8", "22.7", "25.3", "55.4", "0.0", "18.2"]
    assert pipeline[-1].split() == ["1", "unet", "60", "120", "2.0", "2.35", "0.05", "2.19"]  # 120 rows in 60 calls
    assert "composing model" not in perf_analyzer.table([replace(result, composing=())])


def test_the_admin_key_is_left_out_of_printed_commands_and_nothing_else():
    headers = {"triton-grpc-protocol-admin-key": "1"}  # a key that also appears elsewhere in the line
    line = perf_analyzer.printable(["perf_analyzer", "--concurrency-range", "1:4:1", "-H",
                                    "triton-grpc-protocol-admin-key:1", "--admin-key", "1"], headers)
    assert line == "perf_analyzer --concurrency-range 1:4:1 -H 'triton-grpc-protocol-admin-key:<admin key>' " \
                   "--admin-key <admin key>"


@pytest.mark.parametrize("lines, said", [
    (["Request concurrency: 1", "Thread [0] had error: failed to connect to all addresses"],
     "failed to connect to all addresses"),
    (["error: Failed to obtain stable measurement"], "Failed to obtain stable measurement"),
    (["Request concurrency: 1", "Failed to obtain stable measurement within 10 windows."],
     "Request concurrency: 1 Failed to obtain stable measurement within 10 windows."),
])
def test_a_failed_run_is_told_by_its_last_words(lines, said):
    assert perf_analyzer._last_words(lines) == said


def test_a_record_reads_back_as_written(tmp_path):
    (result,) = perf_analyzer.parse_results(CSV, SUMMARY)
    path = perf_analyzer.write_record(tmp_path / "run.json", "python scripts/run_perf_analyzer.py", "perf_analyzer -m x",
                                      [result], {"cpu": "test"})
    assert perf_analyzer.read_record(path) == ("python scripts/run_perf_analyzer.py", "perf_analyzer -m x", [result])


def successes(client, model: str, headers: dict) -> tuple[int, int]:
    """The server's count of successful requests to ``model``, and of the rows they carried."""
    (stats,) = client.get_inference_statistics(model, as_json=True, headers=headers)["model_stats"]
    return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("inference_count", 0))


def grown(client, model: str, headers: dict, before: tuple[int, int], timeout: float = 5.0) -> tuple[int, int]:
    """What the counts grew by, once they stop growing (Triton records a request just after its
    response, so the last ones can still be on their way)."""
    deadline, previous = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        current = successes(client, model, headers)
        if current == previous:
            break
        previous = current
        time.sleep(0.2)
    return previous[0] - before[0], previous[1] - before[1]


def check_figures(result: perf_analyzer.LoadResult) -> None:
    assert result.requests == REQUESTS
    assert math.isfinite(result.throughput) and result.throughput > 0
    assert 0 < result.p50_s <= result.p90_s <= result.p95_s <= result.p99_s
    assert math.isfinite(result.mean_s) and result.mean_s > 0


@pytest.mark.server
def test_perf_analyzer_loads_a_network_at_batch_2(triton_server, tiny_model, tmp_path):
    client, headers = connect(triton_server.grpc_url), triton_server.admin_headers()
    config = client.get_model_config(specs.UNET.name, as_json=True)["config"]
    latents = specs.UNET.inputs[0]
    assert served_shapes(config)[latents.name] == list(
        specs.ModelDims.from_pretrained(tiny_model).resolve(latents.dims))
    before = successes(client, specs.UNET.name, headers)
    arguments = perf_analyzer.network_arguments(config, 2, triton_server.grpc_url, Load(requests=REQUESTS), headers)
    (result,) = perf_analyzer.measure(arguments, tmp_path / "unet.csv", echo=None)
    check_figures(result)
    requests, rows = grown(client, specs.UNET.name, headers, before)
    assert requests >= REQUESTS and rows >= 2 * REQUESTS  # perf_analyzer's, counted by this server
    report(f"perf_analyzer: unet, batch 2, {REQUESTS} requests: {result.throughput:.0f} infer/s, "
           f"p50 {1000 * result.p50_s:.1f} ms, p99 {1000 * result.p99_s:.1f} ms")


@pytest.mark.server
def test_perf_analyzer_loads_the_bls_pipeline_and_reports_its_networks(triton_server, tmp_path):
    client, headers = connect(triton_server.grpc_url), triton_server.admin_headers()
    pipeline = specs.TEXT_TO_IMAGE
    before = {name: successes(client, name, headers) for name in (pipeline.name, specs.UNET.name)}
    input_data = perf_analyzer.write_input_data(
        tmp_path / "input.json", GenerationRequest(prompt=["a red fox"], num_inference_steps=2, seed=0))
    arguments = perf_analyzer.pipeline_arguments(pipeline, input_data, triton_server.grpc_url,
                                                 Load(requests=REQUESTS), headers)
    (result,) = perf_analyzer.measure(arguments, tmp_path / "pipeline.csv", echo=None)
    check_figures(result)
    composing = {model.name: model for model in result.composing}
    assert list(composing) == [network.name for network in pipeline.networks]
    assert all(model.executions >= REQUESTS and model.latency_s > 0 for model in composing.values())
    assert composing[specs.UNET.name].executions >= 2 * REQUESTS  # a call per step, at least
    requests, _ = grown(client, pipeline.name, headers, before[pipeline.name])
    assert requests >= REQUESTS
    unet_calls, _ = grown(client, specs.UNET.name, headers, before[specs.UNET.name])
    assert unet_calls >= composing[specs.UNET.name].executions
    report(f"perf_analyzer: {pipeline.name}, 2 steps, {REQUESTS} requests: {result.throughput:.1f} infer/s, "
           f"p50 {1000 * result.p50_s:.1f} ms; unet {1000 * composing[specs.UNET.name].latency_s:.2f} ms per call "
           f"on the server")


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=120,
                          cwd=PROJECT_ROOT)


@pytest.mark.server
def test_script_prints_perf_analyzers_summary_and_the_parsed_figures(triton_server, tmp_path):
    done = run_script("--url", triton_server.grpc_url, "--admin-key", triton_server.admin_key, "--num-inference-steps", "2",
                      "--requests", "10", "--csv", str(tmp_path / "report.csv"), "--record", str(tmp_path / "run.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert triton_server.admin_key not in done.stdout + (tmp_path / "run.json").read_text()
    invocation, command, (result,) = perf_analyzer.read_record(tmp_path / "run.json")
    assert invocation.startswith("python scripts/run_perf_analyzer.py --url") and "--input-data input_data.json" in command
    assert result.requests == 10 and [m.name for m in result.composing] == [n.name for n in specs.TEXT_TO_IMAGE.networks]
    assert "Request concurrency: 1" in done.stdout and "Composing models:" in done.stdout  # perf_analyzer's
    assert "composing model" in done.stdout and (tmp_path / "report.csv").exists()  # the parsed table


@pytest.mark.server
@pytest.mark.parametrize("arguments, message", [
    (["no_such_model"], "model 'no_such_model' is neither a network nor a pipeline"),
    ([specs.UNET.name], "--admin-key is needed: perf_analyzer reads the statistics API"),
    ([specs.UNET.name, "--admin-key", "wrong"], "--admin-key 'wrong' is not the server's key"),
    (["--batch", "2"], "--batch 2 applies to a network"),
])
def test_script_errors_are_one_line_with_the_fix(triton_server, arguments, message):
    done = run_script("--url", triton_server.grpc_url, *arguments)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


@pytest.mark.slow
def test_script_names_the_url_when_no_server_answers():
    done = run_script("--url", f"127.0.0.1:{free_port()}", specs.UNET.name)
    assert done.returncode == 2 and "no Triton server answers at" in done.stderr, done.stderr[-2000:]
