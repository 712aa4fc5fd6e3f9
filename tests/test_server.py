"""The local Triton launcher: where it binds, how it stops, and how it explains failures."""

from __future__ import annotations

import re
import socket
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from utils.repository import environments
from utils import server as server_module
from utils.deployment import Deployment
from utils.layout import CONFIG_FILE
from utils.server import TritonServer, TritonServerError, shared_libpython

pytestmark = pytest.mark.server  # starts tritonserver

FAILING_MODEL = '''
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights are missing")
'''


@pytest.fixture(scope="module")
def small_repository(tiny_model, exports, tmp_path_factory):
    """The networks and the BLS pipelines, one instance each: the fewest processes, for the tests
    that start, kill and stop servers of their own."""
    from utils.deployment import Placement
    from utils.repository.writer import write_repository

    path = tmp_path_factory.mktemp("small-repository")
    write_repository(path, tiny_model, {name: result.path for name, result in exports.items()},
                     Deployment(ensembles=False, placement=Placement(pipeline_instances=1)))
    return path


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port``, from /proc/net/tcp and tcp6
    (gRPC listens on an IPv6 socket: 127.0.0.1 shows as ::ffff:127.0.0.1)."""
    addresses = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path("/proc/net", table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            hex_address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(hex_address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addresses.add(socket.inet_ntop(family, raw).removeprefix("::ffff:"))
    return addresses


def test_binds_loopback_only(triton_server):
    for port in (triton_server.http_port, triton_server.grpc_port, triton_server.metrics_port):
        assert listening_addresses(port) == {"127.0.0.1"}


def test_stop_ends_the_server_gracefully_and_frees_its_ports(small_repository):
    server = TritonServer(small_repository).start()
    process, port = server.process, server.grpc_port
    # Well inside Triton's 30 s exit timeout: a connection left open by the launcher would make the
    # server wait for it, and stop() would then have to kill it (exit code -9, not 0).
    server.stop(timeout=15)
    assert process.returncode == 0
    assert not server_module.port_in_use(port)
    server.stop()  # stopping twice is harmless


def test_port_in_use_is_explained_before_starting(small_repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = TritonServer(small_repository, grpc_port=port)
        with pytest.raises(TritonServerError, match=rf"port {port} on 127.0.0.1 is already in use \(--grpc-port\)"):
            server.start()
        assert server.process is None


def test_model_that_fails_to_load_is_named_with_its_reason(tmp_path):
    model = tmp_path / "broken_model"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(FAILING_MODEL)
    (model / CONFIG_FILE).write_text('backend: "python"\nmax_batch_size: 0\n'
                                        'input { name: "x" data_type: TYPE_FP32 dims: [1] }\n'
                                        'output { name: "y" data_type: TYPE_FP32 dims: [1] }\n')
    with pytest.raises(TritonServerError, match=r"model 'broken_model' failed to load: .*weights are missing"):
        TritonServer(tmp_path, startup_timeout=60).start()


def test_missing_repository_names_the_step_that_makes_it(tmp_path):
    with pytest.raises(TritonServerError, match=r"does not exist: create it with `python scripts/move_onnx"):
        TritonServer(tmp_path / "nowhere").start()


def test_python_without_shared_libpython_is_explained(monkeypatch):
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var",
                        lambda name: "libpython3.11.a" if name == "LDLIBRARY" else real(name))
    with pytest.raises(TritonServerError, match=r"no shared libpython3\.\d+\.so .* --enable-shared"):
        shared_libpython()


def test_this_python_has_the_shared_libpython():
    assert shared_libpython().exists()



def test_repository_for_the_ngc_image_is_refused_locally_with_the_fix(repository, tiny_model, exports, tmp_path):
    from utils.repository.writer import write_repository

    write_repository(tmp_path, tiny_model, {name: r.path for name, r in exports.items()}, Deployment(backend="tensorrt"))
    with pytest.raises(TritonServerError, match=r"uses platform 'tensorrt_plan', which the pip-installed "
                                                r"tritonserver cannot serve .* --docker"):
        TritonServer(tmp_path).start()


def test_default_command_is_safe(repository):
    command = TritonServer(repository, http_port=1, grpc_port=2, metrics_port=3).command(Path("/server"))
    for flag in ("--grpc-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in command
    # HTTP only when asked for (its frontend allocates a declared input size before reading it), then on loopback.
    assert "--allow-http=false" in command and not any(a.startswith("--http-address") for a in command)
    with_http = TritonServer(repository, http=True, http_port=1, grpc_port=2, metrics_port=3).command(Path("/server"))
    assert "--http-address=127.0.0.1" in with_http and "--allow-http=false" not in with_http
    assert {"--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true"} <= set(command)
    # The APIs that change state or reach another process's memory need a key, even with no model control.
    server = TritonServer(repository, http_port=1, grpc_port=2, metrics_port=3)
    rule = f"model-repository,shared-memory,logging,trace,statistics:admin-key={server.admin_key}"
    assert f"--grpc-restricted-protocol={rule}" in server.command(Path("/server"))
    assert len(server.admin_key) >= 32 and "--load-model=*" not in command


def test_explicit_model_control_restricts_the_admin_apis(repository):
    server = TritonServer(repository, http_port=1, grpc_port=2, metrics_port=3, model_control="explicit")
    command = server.command(Path("/server"))
    rule = f"model-repository,shared-memory,logging,trace,statistics:admin-key={server.admin_key}"
    assert f"--grpc-restricted-protocol={rule}" in command and f"--http-restricted-api={rule}" in command
    assert len(server.admin_key) >= 32  # a fresh random key unless one is given
    assert server.admin_headers() == {"triton-grpc-protocol-admin-key": server.admin_key}


def test_the_supervisors_canary_walks_every_served_pipeline_and_network(triton_server, repository):
    """The check a supervisor runs by default, on the default repository: every network, the BLS
    pipelines, the streams and the ensembles answer it."""
    from utils import specs
    from utils.server.health import canary, served_networks, served_pipelines

    pipelines = served_pipelines(repository)
    assert {specs.ENSEMBLE_TEXT_TO_IMAGE, specs.ENSEMBLE_IMAGE_TO_IMAGE, specs.IMAGE_TO_IMAGE_STREAM} <= set(pipelines)
    canary(triton_server.grpc_url, networks=served_networks(repository), pipelines=pipelines)


def test_models_cannot_be_unloaded_through_the_api_by_default(triton_server):
    from tritonclient.utils import InferenceServerException

    from utils.grpc_client import connect

    client = connect(triton_server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model("unet")
    with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
        client.unload_model("unet", headers=triton_server.admin_headers())  # not even with the key
    assert client.is_model_ready("unet")


def test_default_server_opens_no_api_that_reaches_memory_or_changes_state(triton_server):
    """Registering a stub's own shared-memory region as an output buffer corrupts its messages and
    takes the server down: refused without the key, over gRPC and HTTP; inference, health and
    metadata stay open."""
    import json
    import urllib.error
    import urllib.request

    from tritonclient.utils import InferenceServerException

    from utils.grpc_client import connect

    client = connect(triton_server.grpc_url)
    region = sorted(triton_server.shm_regions)[0]
    refused = [lambda: client.register_system_shared_memory("stub", f"/{region}", 1 << 20),
               lambda: client.register_cuda_shared_memory("stub", b"0" * 64, 0, 1 << 20),
               lambda: client.get_system_shared_memory_status(),
               lambda: client.update_log_settings({"log_verbose_level": 1}),
               lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
               lambda: client.get_inference_statistics()]
    for call in refused:
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    request = urllib.request.Request(
        f"http://{triton_server.http_url}/v2/systemsharedmemory/region/stub/register", method="POST",
        data=json.dumps({"key": f"/{region}", "offset": 0, "byte_size": 1 << 20}).encode())
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 403 and b"restricted" in caught.value.read()
    assert client.get_system_shared_memory_status(headers=triton_server.admin_headers()) is not None  # the key opens it
    assert client.is_server_live() and client.is_model_ready("unet") and client.get_model_metadata("unet")


def test_no_request_content_is_ever_evaluated_or_unpickled():
    root = Path(__file__).resolve().parents[1]
    forbidden = re.compile(r"\b(pickle|marshal|eval\(|exec\(|torch\.load\(|yaml\.load\(|dill)\b")
    offenders = [f"{path.relative_to(root)}:{number}: {line.strip()}"
                 for folder in ("utils", "pipelines", "triton", "scripts")
                 for path in (root / folder).rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1) if forbidden.search(line)]
    assert not offenders, offenders


def test_launcher_stops_its_server_on_sigterm(small_repository, tmp_path):
    import shutil
    import signal
    import subprocess
    import sys

    copy = tmp_path / "repository"
    shutil.copytree(small_repository, copy)
    ports = [str(server_module.free_port()) for _ in range(3)]
    launcher = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts/launch_triton_server.py"),
         "--repository", str(copy), "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
         "--canary-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_line = launcher.stdout.readline()
    assert first_line.startswith(f"Triton is ready: gRPC 127.0.0.1:{ports[1]}"), first_line
    launcher.send_signal(signal.SIGTERM)
    try:
        rest = launcher.communicate(timeout=90)[0]
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise
    assert launcher.returncode == 0 and "Triton stopped." in rest
    assert not any(str(copy) in p.read_bytes().decode(errors="replace")
                   for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()), "a server or stub survived"


REPORT_ENVIRONMENT_MODEL = '''
import sys
import numpy

class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError(f"prefix={sys.prefix} numpy={numpy.__file__}")
'''


def test_a_model_runs_in_its_own_environment_which_shares_this_ones_packages(tmp_path):
    site_packages = environments.create(tmp_path / "models-env")
    model = tmp_path / "repository" / "where_am_i"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(REPORT_ENVIRONMENT_MODEL)
    (model / environments.ARCHIVE_NAME).write_bytes(environments.activation_archive(tmp_path / "models-env"))
    (model / CONFIG_FILE).write_text('backend: "python"\nmax_batch_size: 0\n'
                                        'input { name: "x" data_type: TYPE_FP32 dims: [1] }\n'
                                        'output { name: "y" data_type: TYPE_FP32 dims: [1] }\n'
                                        f'parameters {{ key: "{environments.CONFIG_KEY}" '
                                        f'value {{ string_value: "{environments.CONFIG_VALUE}" }} }}\n')
    with pytest.raises(TritonServerError) as failure:
        TritonServer(model.parent, startup_timeout=60).start()
    # The stub ran in the model's environment, and found numpy through it in this one.
    message = str(failure.value)
    assert f"prefix={tmp_path / 'models-env'}" in message
    assert f"numpy={np.__file__}" in message
    assert site_packages.is_dir()


def test_activation_archive_of_a_folder_without_python_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"'.*nowhere' has no bin/python3: create it with"):
        environments.activation_archive(tmp_path / "nowhere")


def test_a_killed_server_leaves_no_stub_or_region_and_its_log_survives_the_restart(small_repository, tmp_path):
    import os
    import shutil
    import signal

    from conftest import stub_count

    from utils.server import process_group, shm_regions

    copy = tmp_path / "repository"
    shutil.copytree(small_repository, copy)
    server = TritonServer(copy)
    try:
        server.start()
        pid, regions = server.process.pid, set(server.shm_regions)
        assert len(regions) == stub_count(small_repository), regions  # this server's own, one per stub
        os.kill(pid, signal.SIGKILL)
        server.process.wait()
        assert process_group(pid), "the stubs outlive a killed server: what stop() has to end"
        crashed_log = server.log_file.read_text()
        server.restart()  # as the supervisor does
        assert process_group(pid) == {} and not regions & shm_regions()
        log = server.log_file.read_text()
        assert log.startswith(crashed_log) and "--- restarted at" in log  # the dead server's log kept
    finally:
        server.stop()
    assert not server.shm_regions and not regions & shm_regions()


def test_refused_large_prompts_cost_the_memory_of_one_and_a_restart_gives_it_back(tiny_model, exports, tmp_path):
    """Triton 2.51 offers no limit on a request's size at its front door, so a 100 MB prompt is
    received and copied to the pipeline model's stub before the model refuses it. What that
    costs is bounded: the gRPC frontend keeps no request object for reuse (MEMORY_ARGUMENTS),
    glibc gives freed blocks of 64 KiB or more back, the frontend's receive buffers among them
    (MEMORY_ENVIRONMENT), and a stub's shared memory grows to the largest request once. So ten
    more refusals cost no more than one, within 50 MiB (seen: 0-3 MiB), in the BLS pipeline and in
    the ensemble, whose first step refuses it. With a threshold of 1 MiB they cost 10-150 MiB; with
    neither setting each refusal kept up to 100 MB more. A stub's shared memory never shrinks
    (Triton 2.51): the supervisor restarts a server over its memory limit, which gives it all back."""
    import time

    import numpy as np
    from conftest import report
    from tritonclient.utils import InferenceServerException

    from pipelines.bls import BlsPipeline
    from pipelines.ensemble import EnsemblePipeline
    from utils import specs
    from utils.deployment import Deployment, Placement
    from utils.repository.writer import write_repository
    from utils.server.health import Supervisor

    repository = tmp_path / "repository"  # one instance per model: every refusal meets the same stub
    write_repository(repository, tiny_model, {name: result.path for name, result in exports.items()},
                     Deployment(placement=Placement(pipeline_instances=1)))
    huge = {specs.PROMPT.name: np.array([b"x" * 100_000_000], dtype=object)}
    with TritonServer(repository) as server:
        baseline = server.memory()
        bls, ensemble = BlsPipeline(server.grpc_url, retry_for=0), EnsemblePipeline(server.grpc_url)
        ways = {"BLS": lambda: bls.infer(huge), "ensemble": lambda: ensemble.infer(huge, specs.ENSEMBLE_TEXT_TO_IMAGE)}
        for way, send in ways.items():
            costs = []
            for count in (1, 10):
                before = server.memory()
                for _ in range(count):
                    with pytest.raises(InferenceServerException, match=r"prompt\[0\] has 100000000 bytes: the limit"):
                        send()
                time.sleep(1)  # the stub's and the frontend's frees done
                costs.append(server.memory() - before)
            report(f"refused 100 MB prompts through {way}: the first +{costs[0] / 2**20:.0f} MiB, "
                   f"ten more {costs[1] / 2**20:+.0f} MiB")
            assert costs[1] < 50 * 2**20, f"{way}: ten more refusals cost {costs[1] / 2**20:.0f} MiB"

        grown = server.memory() - baseline
        log = []
        with Supervisor(server, interval=0.5, memory_limit=baseline + grown // 2, log=log.append) as supervisor:
            deadline = time.monotonic() + 60
            while not supervisor.restarts and time.monotonic() < deadline:
                time.sleep(0.2)
            while "supervisor: tritonserver is serving again" not in log and time.monotonic() < deadline:
                time.sleep(0.2)
        after = server.memory() - baseline
        report(f"refused 100 MB prompts: server and stubs +{grown / 2**20:.0f} MiB until the supervisor's "
               f"restart, then {after / 2**20:+.0f} MiB")
        assert grown > 100 * 2**20 and supervisor.restarts == 1, log
        assert any("over its limit" in line for line in log), log
        assert after < grown / 2
        assert bls("a cat", num_inference_steps=2, seed=0).shape[0] == 1
