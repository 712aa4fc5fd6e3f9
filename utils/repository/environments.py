"""A Python environment of its own for one Python-backend model.

Why: the 24.10 Python-backend stub is built against numpy 1. Under numpy 2 it mangles string
(BYTES) inputs and numpy-built outputs, so the pipeline model, which takes the prompt as a
string, needs numpy 1.x; the GPU networks (tensors only, through DLPack) run fine with the
machine's numpy 2, and some machines' libraries need it (docs/gpu-notes.md).

How: Triton's per-model ``EXECUTION_ENV_PATH`` names an archive that the Python backend unpacks
and whose ``bin/activate`` it sources before starting the stub; the stub takes its packages from
the first ``python3`` on ``PATH``. The archive written here activates an environment that
already exists on this machine (made by ``create``), so it is a few hundred bytes, not a copy.
"""

from __future__ import annotations

import gzip
import io
import sys
import sysconfig
import tarfile
import venv
from pathlib import Path

from utils.errors import UsageError

ARCHIVE_NAME = "python-environment.tar.gz"  # in the model's folder, next to config.pbtxt
CONFIG_KEY = "EXECUTION_ENV_PATH"
CONFIG_VALUE = f"$$TRITON_MODEL_DIRECTORY/{ARCHIVE_NAME}"


def create(path: Path | str) -> Path:
    """A virtual environment that sees every package of this one, behind its own: what is
    installed into it (``pip install --target <the returned site-packages>``) wins, the rest is
    shared. Returns its site-packages folder."""
    path = Path(path)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
    site_packages = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    # addsitedir, unlike a plain path line, also runs this environment's .pth files (editable installs).
    (site_packages / "shared_with_parent.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    )
    # numpy 2's names for C long, which libraries built for numpy 2 use and numpy 1 lacks: scipy
    # 1.18's sparse module, which transformers' model code imports (the loop with the UNet loads
    # diffusers' UNet here). Run at start, after the line above (.pth files go in name order).
    (site_packages / "zz_numpy2_names.pth").write_text(NUMPY2_NAMES)
    return site_packages


NUMPY2_NAMES = ("import numpy; numpy.__dict__.setdefault('long', numpy.int_); "
                "numpy.__dict__.setdefault('ulong', numpy.uint)\n")


def activation_archive(environment: Path | str) -> bytes:
    """A tar.gz whose ``bin/activate`` puts ``environment``'s ``bin`` first on ``PATH``."""
    environment = Path(environment).resolve()
    if not (environment / "bin" / "python3").exists():
        raise UsageError(
            f"python environment {str(environment)!r} has no bin/python3: create it with "
            f"`python -c \"from utils.repository.environments import create; create('{environment}')\"` "
            f"(a virtual environment of this Python), or leave the option out."
        )
    script = (f'# Sourced by the Python backend before it starts the stub.\n'
              f'export VIRTUAL_ENV="{environment}"\nexport PATH="{environment}/bin:$PATH"\n').encode()
    buffer = io.BytesIO()
    # mtime 0 in gzip's header and the tar's: the same environment gives the same bytes, so
    # writing the repository again finds the archive up to date.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed:
        with tarfile.open(fileobj=compressed, mode="w") as archive:
            info = tarfile.TarInfo("bin/activate")
            info.size, info.mode = len(script), 0o644
            archive.addfile(info, io.BytesIO(script))
    return buffer.getvalue()
