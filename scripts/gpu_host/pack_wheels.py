"""Download the wheels a GPU host without network lacks, for its Python 3.12, into .whl/ (git-ignored).

Such a host installs them from .whl/ (scripts/gpu_host/setup.sh). The versions are requirements.txt's.
To keep the folder small, nvidia-pytriton is repacked with only the Python 3.12 backend stub (the
other stubs and the libpython 3.13 that one of them needs are 16 MB), and numpy and scipy without
their own test suites. numpy 1.26 is for the pipeline models' environment: the 24.10 stub is built
against numpy 1 and mangles string inputs under the machine's numpy 2 (docs/gpu-notes.md); scipy
is for diffusers' LMS scheduler, which a request may choose; peft (with accelerate and psutil) for
LoRA adapters; compel (with pyparsing) for every prompt (pipelines/prompts.py). Run it from the
repository root, with any Python 3 (it needs nothing but the standard library and pip):
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

# Standard library only: this runs before anything of the project is installed anywhere.
REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"
# What a GPU host's own Python (with torch) lacks, at requirements.txt's versions.
PACKAGES = ("nvidia-pytriton", "diffusers", "tritonclient", "numpy", "scipy", "peft", "accelerate", "compel")
# Not pinned in requirements.txt: tritonclient.grpc imports rapidjson, peft imports psutil, compel pyparsing.
DEPENDENCIES = ("python-rapidjson==1.25", "psutil==7.2.2", "pyparsing==3.3.3")
PYTHON = "3.12"


def pinned(names=PACKAGES, requirements: Path = REQUIREMENTS) -> list[str]:
    """``name==version`` for each name, as requirements.txt pins it (extras dropped)."""
    pins = {}
    for line in requirements.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==")
            pins[name.split("[")[0].strip().lower()] = version.strip()
    missing = [name for name in names if name not in pins]
    if missing:
        raise SystemExit(f"{requirements} pins no version of {', '.join(missing)}: pin it there (name==version)")
    return [f"{name}=={pins[name]}" for name in names]


def download(destination: Path, wheels: list[str]) -> None:
    platforms = [f"--platform=manylinux_2_{v}_x86_64" for v in (35, 28, 17)] + ["--platform=manylinux2014_x86_64"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    f"--python-version={PYTHON}", "--implementation=cp", *platforms, "-d", str(destination),
                    *wheels], check=True)


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
    parser.add_argument("--leave-out", nargs="+", default=[], choices=["scipy"],
                        help="packages not to pack (scipy: the host's requests cannot then choose "
                             "LMSDiscreteScheduler, unless the host has scipy)")
    parser.add_argument("--limit-mib", type=float, default=None,
                        help="fail if the wheels take more than this together (a copy with a size cap)")
    args = parser.parse_args(argv)
    wheels = pinned([name for name in PACKAGES if name not in args.leave_out]) + list(DEPENDENCIES)
    download(args.dest, wheels)
    (pytriton,) = args.dest.glob("nvidia_pytriton-*.whl")
    keep_only_stub(pytriton)
    for package in ("numpy", "scipy"):
        for wheel in args.dest.glob(f"{package}-*.whl"):
            drop_tests(wheel)
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    print(f"{args.dest}: {total / 2**20:.1f} MiB of wheels: {', '.join(wheels)}")
    if args.limit_mib is not None and total > args.limit_mib * 2**20:
        raise SystemExit(f"{args.dest} holds {total / 2**20:.1f} MiB, more than --limit-mib {args.limit_mib:g}: "
                         f"remove wheels other than these, or leave one out (--leave-out scipy)")


if __name__ == "__main__":
    main()
