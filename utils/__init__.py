"""Shared code of the Stable Diffusion + ONNX + TensorRT + Triton tutorial."""

import importlib.util
import sys


def _hide_triton_model_folder() -> None:
    """Keep this repository's ``triton/`` folder from passing for OpenAI's Triton compiler.

    When the repository root is on ``sys.path`` (``python -m ...`` or ``python -c`` run from it),
    the ``triton/`` folder of model configs is importable as a namespace package. PyTorch then
    believes the Triton compiler is installed and ``import diffusers`` fails with
    "module 'triton' has no attribute 'language'". A real ``triton`` package, as CUDA builds of
    torch install, always wins over a namespace folder, so this only acts where none exists.
    """
    if "triton" in sys.modules:
        return
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is None:  # a namespace package: just folders
        sys.modules["triton"] = None  # `import triton` now raises ImportError, as if absent


_hide_triton_model_folder()
