"""Tools the operations steps and their tests run that pip does not install: Triton's
``perf_analyzer``, and Prometheus with ``promtool``. ``make tools`` (``python -m utils.tools``)
puts them under ``.tools/``, without root:

- ``perf_analyzer`` comes in the ``tritonclient`` wheel of the server's own release (2.51.0; PyPI's
  ``perf-analyzer`` package is an empty placeholder). It needs ``libb64`` (Debian's ``libb64-0d``)
  and ``libcudart.so.12`` (the ``nvidia-cuda-runtime-cu12`` wheel of requirements.txt), even
  against a CPU-only server.
- ``prometheus`` and ``promtool``: Debian's ``prometheus`` package.

The Debian packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``
(Debian 12, Ubuntu 22.04 or newer; the server's own requirement).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from utils.errors import UserError
from utils.layout import PROJECT_ROOT

TOOLS_DIR = PROJECT_ROOT / ".tools"
TRITONCLIENT_RELEASE = "2.51.0"  # the server's release (nvidia-pytriton 0.7.0 ships tritonserver 2.51.0)
DEBIAN_PACKAGES = {"prometheus": "2.42.0+ds-5+deb12u1", "libb64-0d": "1.2-5+b1"}
INSTALL_COMMAND = "make tools"


class ToolMissing(UserError, FileNotFoundError):
    """A tool is not installed: the message says how to install it."""


def tool(name: str) -> Path:
    """The path of an installed tool: perf_analyzer, prometheus or promtool."""
    path = TOOLS_DIR / "bin" / name
    if not path.exists():
        raise ToolMissing(f"{name} is not installed in {TOOLS_DIR}: run `{INSTALL_COMMAND}` (it needs apt-get and pip, "
                          f"no root).")
    return path


def environment() -> dict[str, str]:
    """The environment a tool runs in: the libraries it needs on LD_LIBRARY_PATH."""
    import nvidia.cuda_runtime

    libraries = [TOOLS_DIR / "lib", Path(nvidia.cuda_runtime.__path__[0]) / "lib"]
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        [*map(str, libraries), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])}


def install(destination: Path = TOOLS_DIR) -> None:
    (destination / "bin").mkdir(parents=True, exist_ok=True)
    (destination / "lib").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        _install_perf_analyzer(destination, work)
        _install_debian_packages(destination, work)
    for name in ("perf_analyzer", "prometheus", "promtool"):
        print(f"{destination / 'bin' / name}")


def _install_perf_analyzer(destination: Path, work: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    f"tritonclient=={TRITONCLIENT_RELEASE}", "-d", str(work)], check=True)
    (wheel,) = work.glob("tritonclient-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        member = f"tritonclient-{TRITONCLIENT_RELEASE}.data/data/bin/perf_analyzer"
        target = destination / "bin" / "perf_analyzer"
        target.write_bytes(archive.read(member))
        target.chmod(0o755)


def _install_debian_packages(destination: Path, work: Path) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ToolMissing("apt-get and dpkg-deb are needed to fetch Debian's prometheus and libb64-0d "
                          "(Debian 12 or Ubuntu 22.04 and newer).")
    pinned = [f"{name}={version}" for name, version in DEBIAN_PACKAGES.items()]
    done = subprocess.run(["apt-get", "download", *pinned], cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolMissing(f"apt-get download {' '.join(pinned)} failed: {done.stderr.strip()[-500:]} "
                          f"(run `apt-get update` first if the package lists are missing).")
    unpacked = work / "unpacked"
    for package in work.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(package), str(unpacked)], check=True)
    for name in ("prometheus", "promtool"):
        shutil.copy2(unpacked / "usr" / "bin" / name, destination / "bin" / name)
    for library in (unpacked / "usr" / "lib" / "x86_64-linux-gnu").glob("libb64.so*"):
        shutil.copy2(library, destination / "lib" / library.name, follow_symlinks=True)


if __name__ == "__main__":
    from utils.cli import main_entry

    main_entry(install)
