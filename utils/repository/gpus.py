"""Which GPUs: the --gpus argument of the scripts, the GPUs this machine has, and the GPUs a
model repository's configs place instances on (checked before a server starts)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from utils import layout
from utils.repository import configs
from utils.deployment import Placement
from utils.errors import UsageError


class GpuError(UsageError):
    """A GPU list that cannot be served here: the message names the argument and the fix."""


def visible_gpus() -> int:
    """How many GPUs a process started here sees (nvidia-smi, narrowed by CUDA_VISIBLE_DEVICES)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    count = sum(line.startswith("GPU ") for line in listed.splitlines())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip() not in ("", "-1")]))
    return count


def parse_gpus(text: str, available: int | None = None) -> tuple[int, ...]:
    """``--gpus`` as indices: "0", "0,1" or "all" (every GPU this machine has)."""
    if text.strip() == "all":
        available = visible_gpus() if available is None else available
        if available == 0:
            raise GpuError("--gpus all: no NVIDIA GPU is visible here (nvidia-smi -L lists none); "
                           "serve on the CPU by leaving --gpus out, or run this on a GPU machine.")
        return tuple(range(available))
    try:
        gpus = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise GpuError(f"--gpus {text!r}: give GPU indices separated by commas, e.g. 0,1, or 'all'.") from None
    Placement(gpus=gpus)  # distinct, non-negative
    return gpus


def repository_gpus(repository: Path) -> dict[str, set[int]]:
    """The GPUs each model of a repository has instances pinned to (models without pins left out)."""
    placed = {}
    for config_file in layout.config_files(repository):
        config = configs.parse_pbtxt(config_file.read_text())
        gpus = {gpu for group in config.instance_group for gpu in group.gpus}
        if gpus:
            placed[config.name or config_file.parent.name] = gpus
    return placed


def check_repository_gpus(repository: Path, available: int) -> None:
    """Refuse a repository that places instances on GPUs this machine does not have."""
    missing = {name: sorted(g for g in gpus if g >= available)
               for name, gpus in repository_gpus(repository).items() if any(g >= available for g in gpus)}
    if missing:
        where = ", ".join(f"{name} on GPU {gpus}" for name, gpus in missing.items())
        have = f"{available} GPU{'s' if available != 1 else ''} (0-{available - 1})" if available else "no GPU"
        raise GpuError(
            f"{repository} places instances where this machine has none ({where}); it has {have}. "
            f"Write the repository again for these GPUs: `python scripts/move_onnx_models_to_triton.py "
            f"--runtime torch --device cuda --gpus all --force --repository {repository}`."
        )
