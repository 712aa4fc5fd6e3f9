"""Download the wheels a GPU host without network lacks, for its Python 3.12, into .whl/ (git-ignored).

Such a host installs them from .whl/ (scripts/gpu_host/setup.sh). To keep the folder small enough
to copy along (--limit-mib, 64 by default), nvidia-pytriton is repacked with only the Python 3.12
backend stub (the other stubs and the libpython 3.13 that one of them needs are 16 MB). numpy 1.26 is for the models' environment only: the 24.10 stub is
built against numpy 1 and mangles string inputs under the machine's numpy 2 (docs/gpu-notes.md).
  python scripts/gpu_host/pack_wheels.py && ls -l .whl   # then copy .whl/ to the host along with the tree
"""

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from utils.cli import main_entry
from utils.errors import UserError

WHEELS = ["nvidia-pytriton==0.7.0", "diffusers==0.42.1", "tritonclient==2.73.0", "python-rapidjson==1.25",
          "numpy==1.26.4"]
PYTHON = "3.12"
DEFAULT_LIMIT_MIB = 64


def download(destination: Path) -> None:
    platforms = [f"--platform=manylinux_2_{v}_x86_64" for v in (35, 28, 17)] + ["--platform=manylinux2014_x86_64"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    f"--python-version={PYTHON}", "--implementation=cp", *platforms, "-d", str(destination),
                    *WHEELS], check=True)


def rewrite_wheel(wheel: Path, dropped: Callable[[str], bool]) -> None:
    """Rewrite a wheel without the files ``dropped`` names, with a RECORD that lists what is left."""
    with zipfile.ZipFile(wheel) as source:
        record = next(n for n in source.namelist() if n.endswith(".dist-info/RECORD"))
        trimmed = wheel.with_suffix(".trimmed")
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
            lines = []
            for info in source.infolist():
                if dropped(info.filename) or info.filename == record:
                    continue
                data = source.read(info)
                target.writestr(info, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                lines.append(f"{info.filename},sha256={digest},{len(data)}")
            target.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    trimmed.replace(wheel)


def keep_only_stub(wheel: Path, python: str = PYTHON) -> None:
    """The nvidia-pytriton wheel without the stubs of other Pythons (and their libraries): only
    the 3.13 stub links the bundled libpython."""
    stubs = "pytriton/tritonserver/python_backend_stubs/"
    rewrite_wheel(wheel, lambda name: (name.startswith(stubs) and not name.startswith(f"{stubs}{python}/"))
                  or "/libpython3" in name)


def drop_tests(wheel: Path) -> None:
    """A wheel without its packages' own test suites (numpy's are a fifth of its wheel)."""
    rewrite_wheel(wheel, lambda name: "/tests/" in name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    parser.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB,
                        help="the most the wheels may take together (what can be copied to the host)")
    args = parser.parse_args(argv)
    download(args.dest)
    (pytriton,) = args.dest.glob("nvidia_pytriton-*.whl")
    keep_only_stub(pytriton)
    for numpy in args.dest.glob("numpy-*.whl"):
        drop_tests(numpy)
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    print(f"{args.dest}: {total / 2**20:.1f} MiB of wheels (the limit is {args.limit_mib:g} MiB)")
    if total > args.limit_mib * 2**20:
        raise UserError(f"{args.dest} holds more than --limit-mib {args.limit_mib:g}: remove wheels that are "
                        f"not listed in {WHEELS}")


if __name__ == "__main__":
    main_entry(main)
