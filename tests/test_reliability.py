"""Faults against the real server: each ends in a clear error within seconds, never a hang, and
service comes back where the project can bring it back (supervisor restart, client retries).

One server of this module's own (explicit model control, so models can be unloaded), shared by
the tests in order; the last one stops it with SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import report
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from pipelines.client_side import ClientSidePipeline
from utils import specs
from utils.server.health import CanaryFailed, Supervisor, canary, served_pipelines
from utils.server import TritonServer

pytestmark = pytest.mark.server  # starts tritonserver

FAST = dict(prompt="a lighthouse at dusk", num_inference_steps=3, seed=21)
LONG = dict(prompt="a long request", num_inference_steps=999, seed=5)  # ~4 s on the tiny model here


@pytest.fixture(scope="module")
def own_repository(bls_repository, tiny_model, exports, adapters, tmp_path_factory):
    """A copy, so that this module's stubs are told apart from the session server's by path, with
    one LoRA adapter's UNet (loaded and unloaded through the API below)."""
    from utils.deployment import Deployment
    from utils.repository.writer import write_repository

    copy = tmp_path_factory.mktemp("faults") / "repository"
    shutil.copytree(bls_repository, copy)
    write_repository(copy, tiny_model, {name: result.path for name, result in exports.items()},
                     Deployment(ensembles=False, adapters=adapters[:1]), force=True)  # its serving.json names it
    return copy


@pytest.fixture(scope="module")
def server(own_repository):
    server = TritonServer(own_repository, model_control="explicit").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(server):
    return BlsPipeline(server.grpc_url)(**FAST)


def admin(server):
    return grpcclient.InferenceServerClient(server.grpc_url), server.admin_headers()


def stub_pids(repository: Path, model: str) -> list[int]:
    """PIDs of the Python-backend stub processes serving ``model``."""
    needle = str(repository / model / "1" / "model.py").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def in_background(call) -> tuple[threading.Thread, dict]:
    outcome = {}

    def target():
        started = time.monotonic()
        try:
            outcome["result"] = call()
        except Exception as error:
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def unet_executions(server) -> int:
    client, headers = admin(server)
    stats = client.get_inference_statistics("unet", headers=headers, as_json=True)["model_stats"][0]
    return int(stats.get("execution_count", 0))


def test_client_timeout_cancels_the_work(server):
    with pytest.raises(InferenceServerException, match="Deadline Exceeded"):
        BlsPipeline(server.grpc_url, timeout=0.5, retry_for=0)(**LONG)
    time.sleep(0.2)  # the step running when the deadline passed finishes
    before = unet_executions(server)
    time.sleep(1.5)  # ~400 more UNet calls if the loop kept going
    after = unet_executions(server)
    report(f"UNet calls in the 1.5 s after a client timeout: {after - before}")
    assert after - before <= 2


def test_admin_apis_need_the_key(server):
    client, headers = admin(server)
    refused = [lambda **h: client.unload_model("unet", **h), lambda **h: client.get_inference_statistics(**h),
               lambda **h: client.get_log_settings(**h), lambda **h: client.get_trace_settings(**h),
               lambda **h: client.get_system_shared_memory_status(**h)]
    for call in refused:
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            call()
    assert client.get_inference_statistics(headers=headers)  # with the key
    assert client.is_model_ready("unet")  # inference and health stay open


def test_killed_stubs_are_found_by_the_canary_and_the_supervisor_restores_service(server, reference, own_repository):
    """A killed stub: the UNet's (a clear error for the pipelines that call it) and a streaming
    pipeline's (one short stream each is part of the canary: found by it, not first by a user).
    One supervisor restart brings every served pipeline back."""
    streams = [spec for spec in served_pipelines(own_repository) if spec.decoupled]
    assert streams == [specs.TEXT_TO_IMAGE_STREAM, specs.IMAGE_TO_IMAGE_STREAM]
    canary(server.grpc_url, pipelines=served_pipelines(own_repository))  # every one answers
    for pid in stub_pids(own_repository, specs.IMAGE_TO_IMAGE_STREAM.name):
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(CanaryFailed, match="not healthy"):
        canary(server.grpc_url, pipelines=streams)

    (pid,) = stub_pids(own_repository, "unet")
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as caught:
        BlsPipeline(server.grpc_url, retry_for=0)(**FAST)
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    assert "model 'unet' failed" in caught.value.message() and "not healthy" in caught.value.message()
    report(f"killed UNet stub: BLS error after {time.monotonic() - started:.1f} s")
    client, _ = admin(server)
    assert client.is_server_ready() and client.is_model_ready("unet")  # why readiness is not enough
    with pytest.raises(Exception, match="not healthy"):
        canary(server.grpc_url)

    log = []
    with Supervisor(server, interval=0.5, failures=1, log=log.append) as supervisor:
        started = time.monotonic()
        images = BlsPipeline(server.grpc_url)(**FAST)  # retries until the restart is done
        report(f"killed UNet stub: service restored by the supervisor in {time.monotonic() - started:.1f} s")
    assert supervisor.restarts >= 1 and any("canary failed" in line for line in log)
    assert np.array_equal(images, reference)
    canary(server.grpc_url, pipelines=served_pipelines(own_repository))  # the streams too


def test_stalled_stub_is_restarted_before_it_can_take_the_server_down(server, reference, own_repository):
    """A stub stopped for seconds (SIGSTOP: swapping, a debugger, a stuck driver call) is reported
    "not healthy"; were it to resume, tritonserver 2.51 would abort. The supervisor restarts at the
    first such canary, which ends the stalled stub with its server before it can resume."""
    (pid,) = stub_pids(own_repository, "unet")
    os.kill(pid, signal.SIGSTOP)
    try:
        log = []
        with Supervisor(server, interval=1.0, failures=2, log=log.append) as supervisor:
            started = time.monotonic()
            images = BlsPipeline(server.grpc_url)(**FAST)  # retries "not healthy" until the restart is done
            seconds = time.monotonic() - started
        report(f"stalled UNet stub: service restored by the supervisor in {seconds:.1f} s")
        assert supervisor.restarts >= 1 and any("not healthy" in line for line in log), log
        assert np.array_equal(images, reference)
        assert not Path(f"/proc/{pid}").exists(), "the stalled stub outlived its server"
        assert server.process.poll() is None
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGCONT)


def test_unloaded_model_fails_in_flight_requests_clearly(server):
    client, headers = admin(server)
    thread, outcome = in_background(lambda: BlsPipeline(server.grpc_url, retry_for=0)(**LONG))
    time.sleep(1.0)
    client.unload_model("unet", headers=headers)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the in-flight request hangs"
    error = outcome.get("error")
    assert isinstance(error, InferenceServerException), outcome
    assert error.status() == "StatusCode.UNAVAILABLE" and "model 'unet' failed" in error.message()
    report(f"unloaded UNet: in-flight request failed after {outcome['seconds']:.1f} s: {error.message()[:90]}")
    client.load_model("unet", headers=headers)
    assert BlsPipeline(server.grpc_url, retry_for=0)(**FAST).shape[0] == 1


def test_an_adapters_unet_is_unloaded_and_loaded_again_through_the_api(server, adapters):
    """Explicit model control: an adapter's UNet leaves memory and comes back while the server
    serves, with the admin key; a request for it meanwhile fails naming the model."""
    client, headers = admin(server)
    name = f"unet_{adapters[0].name}"
    request = dict(FAST, lora=[adapters[0].name])
    with_adapter = BlsPipeline(server.grpc_url, retry_for=0)(**request)
    with pytest.raises(InferenceServerException, match="This protocol is restricted"):
        client.unload_model(name)  # not without the key
    client.unload_model(name, headers=headers)
    assert not client.is_model_ready(name)
    with pytest.raises(InferenceServerException, match=rf"model '{name}' failed") as caught:
        BlsPipeline(server.grpc_url, retry_for=0)(**request)
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    assert BlsPipeline(server.grpc_url, retry_for=0)(**FAST).shape[0] == 1  # the base weights still serve
    start = time.perf_counter()
    client.load_model(name, headers=headers)
    report(f"an adapter's UNet loaded through the API in {time.perf_counter() - start:.1f} s (tiny model, ONNX on CPU)")
    assert np.array_equal(BlsPipeline(server.grpc_url, retry_for=0)(**request), with_adapter)


def test_client_loop_rides_through_a_server_restart(server, reference, tiny_model):
    client_side = ClientSidePipeline(tiny_model, server.grpc_url)
    bls = BlsPipeline(server.grpc_url)
    results, stop = [], threading.Event()

    def loop():
        while not stop.is_set() or len(results) < 6:
            results.append((bls(**FAST), client_side(progress=False, **FAST)))

    thread, outcome = in_background(loop)
    time.sleep(1.0)
    server.restart()
    stop.set()
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert all(np.array_equal(b, reference) and np.abs(c.astype(int) - reference).max() <= 2 for b, c in results)
    report(f"server restarted during a client loop: {len(results)} requests of each pipeline, none failed")


def test_sigterm_with_requests_in_flight_ends_them_clearly(server):
    thread, outcome = in_background(lambda: BlsPipeline(server.grpc_url, retry_for=0)(**LONG))
    time.sleep(1.0)
    process = server.process
    server.stop(timeout=60)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the in-flight request hangs"
    assert process.returncode == 0
    error = outcome.get("error")
    # Triton 24.10 on SIGTERM: in-flight BLS requests fail at their next sub-request.
    assert isinstance(error, InferenceServerException) and error.status() == "StatusCode.UNAVAILABLE", outcome
    report(f"SIGTERM: in-flight request ended after {outcome['seconds']:.1f} s with: {error.message()[:90]}")
