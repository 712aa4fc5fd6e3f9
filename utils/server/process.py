"""The tritonserver process: ports, start, readiness, stop, restart, and what it leaves behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import TritonServerError
from utils.server import access
from utils.server.diagnosis import explain_failure, log_tail
from utils.server.install import check_served_locally, install_tritonserver, server_environment, shared_libpython

LOCALHOST = "127.0.0.1"
SHM_DIR = "/dev/shm"
SHM_PREFIX = "triton_python_backend_shm_region_"
PORTS = ("http_port", "grpc_port", "metrics_port")
# Per model, latency quantiles (p50-p99.9, over the last minute) next to the cumulative counters:
# what a dashboard's latency panel reads, where Triton 2.51 has no latency histograms.
METRICS_ARGUMENTS = ("--metrics-config=summary_latencies=true",)
# Models loaded side by side: Triton's default is 4, so a fifth model that compiles at load (the
# torch runtime's UNet, each loop model's own UNet with --pipeline-loop with-unet: a minute or
# two each) waited for one of the first four to finish.
LOAD_ARGUMENTS = ("--model-load-thread-count=8",)
# No request objects kept for reuse by the gRPC frontend: a kept one keeps the capacity of the
# largest request it held, so each refused 100 MB prompt left up to 100 MB more in the server
# (Triton keeps 8 by default). A fresh object per request costs microseconds against a
# denoising step's milliseconds.
MEMORY_ARGUMENTS = ("--grpc-infer-allocation-pool-size=0",)
# (With install.MEMORY_ENVIRONMENT, what is freed goes back to the system.)


def shm_regions() -> set[str]:
    """The Python backend's shared-memory regions that exist now."""
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith(SHM_PREFIX)}
    except OSError:
        return set()


def process_group(pgid: int) -> dict[int, list[str]]:
    """{pid: command line} of the live processes in a process group (a server and its stubs)."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid:
                members[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ProcessLookupError):
            continue
    return members


def resident_bytes(pgid: int) -> int:
    """Memory a server and its stubs hold: their resident set sizes, summed (a page two of them
    map counts twice, which only errs on the safe side for a limit)."""
    total = 0
    for pid in process_group(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def stub_regions(pgid: int) -> set[str]:
    """The shared-memory regions of a server's own stubs: each stub is given its region's name on
    its command line (counting /dev/shm before and after a start would take in other servers')."""
    return {argument for command in process_group(pgid).values() for argument in command
            if argument.startswith(SHM_PREFIX)}


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
    model_control: str = "none"  # "explicit": models load through the API (behind admin_key, access.py)
    admin_key: str | None = None  # opens the restricted APIs; a random one per server unless given
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    cuda_pool_bytes: int = 2**30  # per GPU that the repository places instances on
    gpus: tuple[int, ...] | None = None  # the GPUs the server may use (CUDA_VISIBLE_DEVICES); None: all
    # Triton 2.51's HTTP frontend allocates an input's declared shape before it reads the data (a
    # 172-byte request can make it allocate 4 GB); gRPC checks the shape first. Off unless asked for.
    http: bool = False
    process: subprocess.Popen | None = field(default=None, init=False)
    shm_regions: set[str] = field(default_factory=set, init=False)  # made by this server's stubs
    starts: int = field(default=0, init=False)
    pool_gpus: set[int] = field(default_factory=set, init=False)  # GPUs given a CUDA memory pool

    ADMIN_HEADER = access.ADMIN_HEADER

    def __post_init__(self):
        self.access = access.AccessPolicy(self.model_control, self.admin_key)
        self.admin_key = self.access.admin_key

    def admin_headers(self, protocol: str = "grpc") -> dict[str, str]:
        """Headers that open the restricted APIs (explicit model control only)."""
        return self.access.headers(protocol)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus' scrape address: http://<metrics_url>/metrics."""
        return f"{self.host}:{self.metrics_port}"

    def command(self, server_dir: Path) -> list[str]:
        return [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={Path(self.model_repository).resolve()}",
            f"--backend-directory={server_dir / 'backends'}",
            *([f"--http-address={self.host}", f"--http-port={self.http_port}"] if self.http
              else ["--allow-http=false"]),
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-cpu-metrics=false", *METRICS_ARGUMENTS, *LOAD_ARGUMENTS, *MEMORY_ARGUMENTS,
            "--strict-readiness=true",  # ready only when every model is
            "--exit-on-error=true",  # a model that fails to load stops the start, with its error
            f"--exit-timeout-secs={self.exit_timeout}",
            *self.access.arguments(),
            "--log-info=true",
            *(f"--cuda-memory-pool-byte-size={gpu}:{self.cuda_pool_bytes}" for gpu in sorted(self.pool_gpus)),
            *self.extra_args,
        ]

    def ports(self) -> tuple[str, ...]:
        """The port attributes this server listens on."""
        return PORTS if self.http else tuple(p for p in PORTS if p != "http_port")

    def memory(self) -> int:
        """Bytes the running server and its stubs hold (0 when it is not running)."""
        return resident_bytes(self.process.pid) if self.process else 0

    def _check_gpus(self, repository: Path) -> set[int]:
        """The GPUs the repository places instances on, which this machine must have; each gets a
        CUDA memory pool for the GPU tensors that Python models pass each other by DLPack."""
        from utils.repository.gpus import GpuError, check_repository_gpus, repository_gpus, visible_gpus

        placed = set().union(*repository_gpus(repository).values())
        if placed:
            try:
                check_repository_gpus(repository, visible_gpus() if self.gpus is None else len(self.gpus))
            except GpuError as error:
                raise TritonServerError(str(error)) from None
        return placed

    def _choose_ports(self) -> None:
        for name in self.ports():
            port = getattr(self, name)
            if port is None:
                setattr(self, name, free_port(self.host))
            elif port_in_use(port, self.host):
                flag = "--" + name.replace("_", "-")
                raise TritonServerError(
                    f"port {port} on {self.host} is already in use ({flag}): stop what is using it "
                    f"(another tritonserver?) or pass another {flag}, or leave it out to pick a free port."
                )

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
        self._choose_ports()
        if self.log_file is None:
            self.log_file = Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        # A restart appends: the log of the server that died (its abort message) stays readable.
        with open(self.log_file, "ab" if self.starts else "wb") as log:
            if self.starts:
                log.write(f"\n--- restarted at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode())
                log.flush()
            self.process = subprocess.Popen(
                self.command(server_dir), stdout=log, stderr=subprocess.STDOUT,
                env=server_environment(libpython, self.gpus),
                start_new_session=True,  # its own process group: stop() ends the stubs with it
            )
        self.starts += 1
        self._wait_until_ready()
        self.shm_regions = stub_regions(self.process.pid)
        return self

    def _wait_until_ready(self) -> None:
        from utils.grpc_client import connect  # gRPC: tritonclient's HTTP client needs gevent too

        # Closed when ready: an open connection can hold up the server's shutdown for its whole
        # exit timeout (30 s).
        client = connect(self.grpc_url)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise TritonServerError(
                        explain_failure(self.log_file, f"tritonserver exited with code {self.process.returncode}"))
                try:
                    if client.is_server_ready(client_timeout=2):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        self.stop()
        raise TritonServerError(explain_failure(self.log_file,
                                                f"tritonserver was not ready after {self.startup_timeout:.0f} s"))

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_file, lines)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the process this object started and its stubs, nothing else; also after the
        server died or was killed, when its stubs live on without it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()  # the server stops its Python-backend stubs itself
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.shm_regions |= stub_regions(process.pid)  # stubs still alive (a dead server's) say theirs
        try:  # anything of its process group still alive (a stuck or orphaned stub) goes too
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while process_group(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # A stub that was killed (or a server that had to be) leaves its shared-memory region
        # behind; the regions this server's stubs made are known, so remove those left.
        for region in self.shm_regions & shm_regions():
            Path(SHM_DIR, region).unlink(missing_ok=True)
        self.shm_regions = set()

    def restart(self, stop_timeout: float = 30.0) -> TritonServer:
        """Stop and start again on the same ports, so clients reconnect to the same address."""
        self.stop(stop_timeout)
        for name in self.ports():  # wait for the old sockets to go
            port = getattr(self, name)
            deadline = time.monotonic() + 30
            while port_in_use(port, self.host) and time.monotonic() < deadline:
                time.sleep(0.2)
        return self.start()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
