"""The model repository's layout and the names Triton serves, written once.

The repository writer (utils/repository/writer.py), the Triton-side models (utils/python_backend/,
triton/models/), the engine builder and every client import these; none spells a path, a version
folder or a served name itself.

Per network::

    <repository>/<served name>/config.pbtxt
    <repository>/<served name>/1/model.onnx      (and model.onnx.data for graphs over 2 GB)
    <repository>/<served name>/1/model.py        python backend: the runtime that serves it
    <repository>/<served name>/1/checkpoint/     torch runtime: the checkpoint's configs and weights
    <repository>/<served name>/2/model.plan      TensorRT (and engine.json, its provenance)

Per pipeline model::

    <repository>/<pipeline>/1/model.py, 1/stable_diffusion/ (tokenizer, scheduler, configs), 1/serving.json
"""

from __future__ import annotations

import re
from pathlib import Path

from utils.errors import UsageError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_MODELS = PROJECT_ROOT / "triton" / "models"  # the committed pipeline models
# Those only some deployments serve, apart: a server loads every model of its repository, and
# triton/models is the SD1.x walkthrough's, which a deployment without them is written into too.
CONTROLNET_MODELS = PROJECT_ROOT / "triton" / "controlnet_models"  # with --controlnet: its ensemble and step
REFINER_MODELS = PROJECT_ROOT / "triton" / "refiner_models"  # with SDXL's --refiner: base then refiner's
DEFAULT_REPOSITORY = Path("triton/models")  # the walkthrough's repository (relative to the project)
PRODUCTION_REPOSITORY = Path("triton/production")  # the production path's (TensorRT engines)
# SDXL's walkthrough repository: its pipeline models' configs carry SDXL's tensors, so they cannot go
# where the committed SD1.x ones are (triton/models).
SDXL_REPOSITORY = Path("triton/sdxl")

CONFIG_FILE = "config.pbtxt"  # every model's, at the top of its folder
ONNX_VERSION = 1  # 1/model.onnx (ONNX Runtime, and the python backend's runtimes)
ENGINE_VERSION = 2  # 2/model.plan (TensorRT)
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"  # the weights of a graph over 2 GB
PLAN_FILE = "model.plan"
CHECKPOINT_DIR = "checkpoint"  # in a torch-runtime network's version folder
PIPELINE_FILES = "stable_diffusion"  # in a pipeline model's version folder: no weights
REFINER_FILES = "refiner"  # SDXL's refiner's, where served: in PIPELINE_FILES
SERVING_FILE = "serving.json"  # in a pipeline model's version folder: precision, devices, GPUs, image sizes

_GPU_COPY = re.compile(r"^(?P<network>.+)_gpu(?P<gpu>\d+)$")
# The name of a network's variant (a LoRA adapter's UNet, a ControlNet), served as <network>_<name>:
# lower case, digits and dashes.
SERVED_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def served_name(network: str, gpu: int | None = None, adapter: str | None = None) -> str:
    """The name a network is served under: its own, or ``<network>_gpu<N>`` for its copy on GPU N
    (on several GPUs each GPU serves its own copy; utils/deployment.py says why); with a LoRA
    adapter fused in (utils/lora.py), ``<network>_<adapter>`` (and its GPU after that), and so
    each of a deployment's ControlNets, ``controlnet_<name>`` (utils/controlnet.py)."""
    name = network if adapter is None else f"{network}_{adapter}"
    return name if gpu is None else f"{name}_gpu{gpu}"


def parse_named(flag: str, text: str, network: str, example: str) -> tuple[str, str]:
    """``NAME=PATH``, as --lora and --controlnet take it: the variant's name, served as
    ``<network>_<name>``, and where it comes from; ``example``: a right one, for the error."""
    name, separator, source = text.partition("=")
    if not separator or not source:
        raise UsageError(f"{flag} {text!r}: give NAME=PATH, e.g. {flag} {example}.")
    if not SERVED_NAME.match(name):
        raise UsageError(f"{flag} {text!r}: the name {name!r} is served as {network}_{name}; use lower-case letters, "
                         f"digits and dashes (at most 40), starting with a letter or digit.")
    return name, source


def network_of(model_name: str) -> str:
    """The network a served name stands for: ``unet_gpu1`` and ``unet_<adapter>`` -> ``unet``,
    ``controlnet_<name>`` -> ``controlnet``; other names unchanged."""
    from utils.families import FAMILIES
    from utils.specs import CONTROL_NETWORKS

    match = _GPU_COPY.match(model_name)
    name = match["network"] if match else model_name
    networks = {*CONTROL_NETWORKS, *(network for family in FAMILIES.values() for network in family.networks)}
    if name in networks:  # (text_encoder_2 is a network of its own, not a variant of text_encoder)
        return name
    return next((network for network in sorted(networks, key=len, reverse=True) if name.startswith(f"{network}_")),
                name)


def config_file(repository: Path, model: str) -> Path:
    return Path(repository) / model / CONFIG_FILE


def config_files(repository: Path) -> list[Path]:
    """Every model's config in a repository, by model name."""
    return sorted(Path(repository).glob(f"*/{CONFIG_FILE}"))


def serving_file(repository: Path, pipeline: str) -> Path:
    """A pipeline model's serving.json (utils/deployment.py's Serving)."""
    return Path(repository) / pipeline / str(ONNX_VERSION) / SERVING_FILE
