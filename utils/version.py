"""The project's own version, for results that must say which code made them.

The commit only where this project is the git repository (never the commit of a repository that
merely encloses a copy of it), and always a hash of the source files, which is what the code is
even where there is no git at all, or a stale one.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from utils.layout import PROJECT_ROOT

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
