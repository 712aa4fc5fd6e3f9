"""The project's own version, and the machine and packages, for results that must say what made them.

The commit only where this project is the git repository (never the commit of a repository that
merely encloses a copy of it), and always a hash of the source files, which is what the code is
even where there is no git at all, or a stale one.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from utils.layout import PROJECT_ROOT

PACKAGES = ("torch", "diffusers", "transformers", "onnxruntime", "tritonclient", "nvidia-pytriton", "numpy")
SOURCE_PATTERNS = ("optim/*.py", "pipelines/*.py", "scripts/*", "utils/**/*.py", "triton/models/*/1/model.py",
                   "docker/**/*", "setup.py", "requirements.txt", "Makefile")


def source_files(root: Path = PROJECT_ROOT) -> list[Path]:
    found = {path for pattern in SOURCE_PATTERNS for path in root.glob(pattern) if path.is_file()}
    return sorted(p for p in found if "__pycache__" not in p.parts)


def tree_hash(root: Path = PROJECT_ROOT) -> str:
    """sha256 over the source files' paths and contents."""
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def project_version(root: Path = PROJECT_ROOT) -> dict:
    """{"tree_sha256": ..., and where ``root`` is itself a git repository: "git_commit", "git_dirty"}."""
    version = {"tree_sha256": tree_hash(root)}
    toplevel = _git(root, "rev-parse", "--show-toplevel")
    if toplevel and Path(toplevel).resolve() == root.resolve():
        version["git_commit"] = _git(root, "rev-parse", "HEAD")
        version["git_dirty"] = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    return version


def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_and_versions() -> dict:
    """The machine (CPU, GPU) and the versions of Python, the packages and this project."""
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {},
        "project": project_version(),
    }
    for package in PACKAGES:
        try:
            env["versions"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env["versions"][package] = None
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
