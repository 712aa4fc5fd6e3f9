"""Start and stop a real Triton Inference Server with no Docker: the one in ``nvidia-pytriton``.

The ``nvidia-pytriton`` wheel ships tritonserver 2.51.0 (the NGC 24.10 release) with the Python
backend and ensembles, but not ready to run as a plain server. What it needs (DESIGN.md section 5):

- a writable copy of ``pytriton/tritonserver`` whose ``backends/python/`` holds the stub built
  for this Python (``python_backend_stubs/3.X/triton_python_backend_stub``);
- ``LD_LIBRARY_PATH`` with, first, the folder of this interpreter's shared ``libpython3.X.so``
  (else the stub may load another libpython 3.X and fail with "undefined symbol"), then the
  wheel's ``nvidia_pytriton.libs``;
- this environment's ``bin`` first on ``PATH``: the stub finds packages through ``python3``
  (it ignores ``PYTHONPATH``). A model can run in another environment of the same Python
  (utils/environments.py): the pipeline model needs numpy 1.x where the machine has numpy 2.

With Docker, the project's serving image runs the same repository (utils/docker.py).
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOCALHOST = "127.0.0.1"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-triton"


class TritonServerError(RuntimeError):
    """The server could not start or stopped: the message says why and how to fix it."""


SHM_DIR = "/dev/shm"
SHM_PREFIX = "triton_python_backend_shm_region_"


def _shm_regions() -> set[str]:
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith(SHM_PREFIX)}
    except OSError:
        return set()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt in a script, so that its ``with TritonServer`` blocks and
    ``finally`` clauses stop the server it started instead of leaving it running."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = LOCALHOST) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def shared_libpython() -> Path:
    """The shared libpython of this interpreter, which the Python backend stub must load."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    name = sysconfig.get_config_var("LDLIBRARY") or ""
    library = Path(libdir) / name
    if not name.endswith(".so") and not name.endswith(".so.1.0") or not library.exists():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise TritonServerError(
            f"This Python ({sys.executable}) has no shared libpython{version}.so (LDLIBRARY={name!r} in "
            f"{libdir!r}); the Triton Python backend stub needs one. Use a Python built with "
            f"--enable-shared (python.org or distribution builds are; with pyenv: "
            f"PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install {version}), or run the server "
            f"with Docker (`python scripts/launch_triton_server.py --docker`)."
        )
    return library


def check_served_locally(repository: Path) -> None:
    """The wheel's tritonserver has the Python backend only: say so before it fails to load."""
    from utils import configs

    for config_file in sorted(Path(repository).glob("*/config.pbtxt")):
        platform = configs.parse_pbtxt(config_file.read_text()).platform
        if platform:
            raise TritonServerError(
                f"{config_file} uses platform {platform!r}, which the pip-installed tritonserver cannot serve "
                f"(it has the Python backend only). Serve this repository with Docker "
                f"(`python scripts/launch_triton_server.py --docker`), or write it for the local server with "
                f"`python scripts/move_onnx_models_to_triton.py --backend python --force`."
            )


def install_tritonserver(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A writable tritonserver folder from the wheel, with this Python's backend stub in place."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise TritonServerError(
            "nvidia-pytriton is not installed in this environment: `pip install -r requirements.txt` "
            "(or `make venv`) installs it; on glibc older than 2.35 use Docker instead."
        )
    wheel_server = Path(spec.origin).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel_server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonServerError(f"nvidia-pytriton has no Python backend stub for Python {version}: use Python 3.8-3.13.")
    target = cache_dir / f"tritonserver-py{version}-{_fingerprint(wheel_server)}"
    if not (target / "backends" / "python" / stub.name).exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tritonserver-"))
        try:
            shutil.copytree(wheel_server, staging / "server", symlinks=True)
            shutil.copy2(stub, staging / "server" / "backends" / "python" / stub.name)
            os.replace(staging / "server", target) if not target.exists() else None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _fingerprint(path: Path) -> str:
    binary = path / "bin" / "tritonserver"
    return f"{binary.stat().st_size:x}-{int(binary.stat().st_mtime):x}"


def server_environment(libpython: Path, gpus: tuple[int, ...] | None = None) -> dict[str, str]:
    # Located, not imported: importing pytriton needs packages the server does not (gevent).
    libs = Path(importlib.util.find_spec("pytriton").origin).resolve().parents[1] / "nvidia_pytriton.libs"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libpython.parent), str(libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    if gpus is not None:  # the repository's GPU indices then count within these
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return env


@dataclass
class TritonServer:
    """A local tritonserver process: ``with TritonServer(repo) as server: server.grpc_url``."""

    model_repository: Path
    host: str = LOCALHOST
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    startup_timeout: float = 180.0
    exit_timeout: int = 30  # seconds Triton waits for in-flight requests on SIGTERM
    # "none": the repository is fixed at start (the safe default). "explicit": models can be
    # loaded and unloaded through the API, which is then restricted to holders of admin_key.
    model_control: str = "none"
    admin_key: str | None = None
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    cuda_pool_bytes: int = 2**30  # per GPU that the repository places instances on
    gpus: tuple[int, ...] | None = None  # the GPUs the server may use (CUDA_VISIBLE_DEVICES); None: all
    process: subprocess.Popen | None = field(default=None, init=False)
    shm_regions: set[str] = field(default_factory=set, init=False)  # made by this server's stubs
    pool_gpus: set[int] = field(default_factory=set, init=False)  # GPUs given a CUDA memory pool

    # The APIs that can change or reveal the server's state; open only with the admin key when
    # models can be loaded through the API.
    ADMIN_APIS = "model-repository,shared-memory,logging,trace,statistics"
    ADMIN_HEADER = "admin-key"

    def __post_init__(self):
        if self.model_control not in ("none", "explicit"):
            raise ValueError(f"model_control={self.model_control!r}: use 'none' or 'explicit'.")
        if self.model_control == "explicit" and self.admin_key is None:
            self.admin_key = secrets.token_urlsafe(24)

    def admin_headers(self, protocol: str = "grpc") -> dict[str, str]:
        """Headers that open the restricted APIs (explicit model control only); Triton's gRPC
        frontend expects the header name with a ``triton-grpc-protocol-`` prefix."""
        if not self.admin_key:
            return {}
        prefix = "triton-grpc-protocol-" if protocol == "grpc" else ""
        return {prefix + self.ADMIN_HEADER: self.admin_key}

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def command(self, server_dir: Path) -> list[str]:
        return [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={Path(self.model_repository).resolve()}",
            f"--backend-directory={server_dir / 'backends'}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-cpu-metrics=false",
            "--strict-readiness=true",  # ready only when every model is
            "--exit-on-error=true",  # a model that fails to load stops the start, with its error
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--model-control-mode={self.model_control}",
            *self._restrictions(),
            "--log-info=true",
            *(f"--cuda-memory-pool-byte-size={gpu}:{self.cuda_pool_bytes}" for gpu in sorted(self.pool_gpus)),
            *self.extra_args,
        ]

    def _restrictions(self) -> list[str]:
        if self.model_control != "explicit":
            return []
        rule = f"{self.ADMIN_APIS}:{self.ADMIN_HEADER}={self.admin_key}"
        return ["--load-model=*", f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]

    def _check_gpus(self, repository: Path) -> set[int]:
        """The GPUs the repository places instances on, which this machine must have; each gets a
        CUDA memory pool for the GPU tensors that Python models pass each other by DLPack."""
        from utils.gpus import GpuError, check_repository_gpus, repository_gpus, visible_gpus

        placed = set().union(*repository_gpus(repository).values())
        if placed:
            try:
                check_repository_gpus(repository, visible_gpus() if self.gpus is None else len(self.gpus))
            except GpuError as error:
                raise TritonServerError(str(error)) from None
        return placed

    def start(self) -> TritonServer:
        repository = Path(self.model_repository)
        if not repository.is_dir():
            raise TritonServerError(
                f"model repository {repository} does not exist: create it with "
                f"`python scripts/move_onnx_models_to_triton.py` (after the ONNX export)."
            )
        check_served_locally(repository)
        self.pool_gpus = self._check_gpus(repository)
        libpython = shared_libpython()
        server_dir = install_tritonserver()
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if port is None:
                setattr(self, name, free_port(self.host))
            elif port_in_use(port, self.host):
                flag = "--" + name.replace("_", "-")
                raise TritonServerError(
                    f"port {port} on {self.host} is already in use ({flag}): stop what is using it "
                    f"(another tritonserver?) or pass another {flag}, or leave it out to pick a free port."
                )
        if self.log_file is None:
            self.log_file = Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        log = open(self.log_file, "wb")
        regions_before = _shm_regions()
        self.process = subprocess.Popen(
            self.command(server_dir), stdout=log, stderr=subprocess.STDOUT,
            env=server_environment(libpython, self.gpus),
            start_new_session=True,  # its own process group: stop() ends the stubs with it
        )
        log.close()
        self._wait_until_ready()
        self.shm_regions = _shm_regions() - regions_before
        return self

    def _wait_until_ready(self) -> None:
        from pipelines.client import connect  # gRPC: tritonclient's HTTP client needs gevent too

        # Closed when ready: an open connection can hold up the server's shutdown for its whole
        # exit timeout (30 s).
        client = connect(self.grpc_url)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise TritonServerError(
                        self._explain_failure(f"tritonserver exited with code {self.process.returncode}")
                    )
                try:
                    if client.is_server_ready(client_timeout=2):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        self.stop()
        raise TritonServerError(self._explain_failure(f"tritonserver was not ready after {self.startup_timeout:.0f} s"))

    def log_tail(self, lines: int = 30) -> str:
        if self.log_file is None or not Path(self.log_file).exists():
            return ""
        return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])

    def _explain_failure(self, what: str) -> str:
        log = Path(self.log_file).read_text(errors="replace") if self.log_file else ""
        hints = []
        for model, reason in re.findall(r"failed to load '([^']+)' version \d+: (.+)", log):
            hints.append(f"model '{model}' failed to load: {reason.strip()}")
        if re.search(r"undefined symbol|libpython\S* cannot open", log):
            hints.append("the Python backend stub loaded the wrong libpython: run it through this launcher, which "
                         "puts this interpreter's LIBDIR first on LD_LIBRARY_PATH")
        if re.search(r"already in use|Address already in use", log):
            hints.append("a port is already in use: pass other --http-port/--grpc-port/--metrics-port, or none")
        if re.search(r"ModuleNotFoundError|No module named", log):
            hints.append("a model could not import a package: install the project into this environment "
                         "(`make venv`) and start the server from it")
        hint = "; ".join(hints) if hints else "see the log"
        return f"{what}: {hint}.\nLog: {self.log_file}\n--- last lines ---\n{self.log_tail()}"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the process this object started (and its stubs), nothing else."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # the server stops its Python-backend stubs itself
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        try:  # anything of its process group still alive (a stuck stub) goes too
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # A stub that was killed (or a server that had to be) leaves its shared-memory region
        # behind; the regions this server's stubs made are known, so remove those left.
        for region in self.shm_regions & _shm_regions():
            Path(SHM_DIR, region).unlink(missing_ok=True)
        self.shm_regions = set()

    def restart(self, stop_timeout: float = 30.0) -> TritonServer:
        """Stop and start again on the same ports, so clients reconnect to the same address."""
        self.stop(stop_timeout)
        for name in ("http_port", "grpc_port", "metrics_port"):  # wait for the old sockets to go
            port = getattr(self, name)
            deadline = time.monotonic() + 30
            while port_in_use(port, self.host) and time.monotonic() < deadline:
                time.sleep(0.2)
        return self.start()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

