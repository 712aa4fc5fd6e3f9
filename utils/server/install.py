"""A runnable tritonserver from the ``nvidia-pytriton`` wheel, and the environment it runs in.

The wheel ships tritonserver 2.51.0 (the NGC 24.10 release) with the Python backend and ensembles,
but not ready to run as a plain server. What it needs:

- a writable copy of ``pytriton/tritonserver`` whose ``backends/python/`` holds the stub built
  for this Python (``python_backend_stubs/3.X/triton_python_backend_stub``);
- ``LD_LIBRARY_PATH`` with, first, the folder of this interpreter's shared ``libpython3.X.so``
  (else the stub may load another libpython 3.X and fail with "undefined symbol"), then the
  wheel's ``nvidia_pytriton.libs``;
- this environment's ``bin`` first on ``PATH``: the stub finds packages through ``python3``
  (it ignores ``PYTHONPATH``). A model can run in another environment of the same Python
  (utils/repository/environments.py): the pipeline model needs numpy 1.x where the machine has numpy 2.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from utils import layout
from utils.errors import TritonServerError

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-triton"
COMPILE_CACHE = DEFAULT_CACHE / "torch-compile"
# glibc gives every block of 64 KiB or more back to the system when it is freed. The gRPC frontend
# receives a request in buffers of 64 KiB: under glibc's own threshold they stay in malloc's
# arenas, fragmented, and each refused 100 MB prompt left 10-50 MiB more in the server (a
# threshold of 1 MiB, then 128 and 256 KiB, still did; 64 KiB: 2-3 MiB after ten). Every larger
# allocation then costs a map and an unmap: the tiny served pipeline on the CPU moved within its
# noise (0.14-0.15 s per image against 0.12-0.14 s). tests/test_server.py measures the memory.
MEMORY_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**10)}


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
    """The wheel's tritonserver has the Python backend and ensembles only: say so before it fails
    to load a TensorRT or ONNX Runtime model."""
    from utils.repository import configs

    for config_file in layout.config_files(repository):
        platform = configs.parse_pbtxt(config_file.read_text()).platform
        if platform and platform != "ensemble":
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


def torch_default_cache_dir() -> str | None:
    """Where torch keeps Inductor's cache when told nothing (None where torch is not installed)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return default_cache_dir()


def server_environment(libpython: Path, gpus: tuple[int, ...] | None = None) -> dict[str, str]:
    # Located, not imported: importing pytriton needs packages the server does not (gevent).
    libs = Path(importlib.util.find_spec("pytriton").origin).resolve().parents[1] / "nvidia_pytriton.libs"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libpython.parent), str(libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    # torch.compile's kernels (the torch runtime's --torch-compile) kept across restarts: with them
    # a restart recompiles in a fraction of the first start's time. /tmp, torch's own default,
    # does not survive a reboot or a container. A user's own directory wins, but not torch's
    # default, which torch writes into this process's environment itself once torch._dynamo is
    # imported (a benchmark that compiled diffusers): a restart would then look elsewhere than the
    # start, and miss (seen on a GPU: every graph compiled again).
    if env.get("TORCHINDUCTOR_CACHE_DIR") in (None, torch_default_cache_dir()):
        env["TORCHINDUCTOR_CACHE_DIR"] = str(COMPILE_CACHE)
    for name, value in MEMORY_ENVIRONMENT.items():
        env.setdefault(name, value)
    if gpus is not None:  # the repository's GPU indices then count within these
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return env
