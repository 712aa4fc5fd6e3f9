"""ControlNets: named in a deployment, checked against the checkpoint before anything is written;
the tiny ones the demo and the tests build; and the control images a server makes from a photo.

A ControlNet is a diffusers ``ControlNetModel`` folder (as its ``save_pretrained`` writes it; for
SD1.5, e.g. ``lllyasviel/sd-controlnet-canny`` from the hub). A deployment serves each one as a
network of its own, ``controlnet_<name>`` (utils/specs.py's controlnet_model), exported, served and
built for TensorRT like the other networks, beside ``controlled_unet``, the UNet that adds its
residuals. A request names the ControlNets it uses in ``controlnet`` and sends one control image
for each (docs/controlnet.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import UsageError, UserError
from utils.model_dims import residual_layout
from utils.request import LORA_NAME

TINY = "tiny"  # --controlnet NAME=tiny: a random ControlNet for the checkpoint, built here
# Canny's hysteresis thresholds, as diffusers' ControlNet guide makes a control image with OpenCV.
CANNY_THRESHOLDS = (100, 200)
CONTROL_MODES = ("canny",)  # what a server can make a control image from a photo with


class ControlNetError(UserError, ValueError):
    """A ControlNet that does not fit the checkpoint: nothing is written."""


@dataclass(frozen=True)
class ServedControlNet:
    """One ControlNet of a deployment: its served name and where it comes from (a folder, a hub
    id, or ``tiny``)."""

    name: str
    source: str

    @classmethod
    def parse(cls, text: str) -> ServedControlNet:
        """``NAME=PATH``, as --controlnet takes it."""
        name, separator, source = text.partition("=")
        if not separator or not source:
            raise UsageError(f"--controlnet {text!r}: give NAME=PATH, e.g. --controlnet canny=lllyasviel/sd-controlnet-"
                             f"canny (a ControlNetModel folder or hub id), or NAME={TINY} for a random one.")
        if not LORA_NAME.match(name):
            raise UsageError(f"--controlnet {text!r}: the name {name!r} is served as controlnet_{name}; use lower-case "
                             f"letters, digits and dashes (at most 40), starting with a letter or digit.")
        return cls(name, source)


def check_names(controlnets: tuple[ServedControlNet, ...]) -> None:
    names = [controlnet.name for controlnet in controlnets]
    if len(set(names)) != len(names):
        raise UsageError(f"--controlnet names {names}: each ControlNet needs a name of its own.")


def controlnet_folder(controlnet: ServedControlNet, model_dir: Path, models_dir: Path) -> Path:
    """The ControlNet's folder, checked against the checkpoint: the one given, downloaded from the
    hub, or the tiny one built for ``model_dir`` (seeded by its name, so each name has weights of
    its own)."""
    if controlnet.source == TINY:
        seed = int.from_bytes(hashlib.sha256(controlnet.name.encode()).digest()[:4], "little")
        folder = Path(models_dir) / f"{Path(model_dir).name}-controlnet" / controlnet.name
        if not (folder / "config.json").exists():
            build_tiny_controlnet(model_dir, folder, seed)
    elif Path(controlnet.source).is_dir():
        folder = Path(controlnet.source)
    elif "/" in controlnet.source and not controlnet.source.startswith((".", "/")):
        folder = _download(controlnet)
    else:
        raise ControlNetError(f"--controlnet {controlnet.name}={controlnet.source}: no such folder. Give a "
                              f"ControlNetModel folder or hub id, or {TINY} for a random one.")
    check_controlnet(model_dir, folder, f"--controlnet {controlnet.name}={controlnet.source}")
    return folder


def _download(controlnet: ServedControlNet) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(controlnet.source, allow_patterns=["config.json", "*.safetensors"],
                                      ignore_patterns=["*.fp16.*"]))
    except Exception as error:  # network, auth or unknown repository: one message with the ways out
        raise ControlNetError(f"--controlnet {controlnet.name}={controlnet.source}: could not download it from the "
                              f"Hugging Face hub ({error}). Check the id and your network, or give a local folder.") \
            from error


def check_controlnet(model_dir: Path, folder: Path, label: str) -> None:
    """A ControlNet fits a checkpoint when its residuals are the UNet's skip connections (the same
    blocks, channels and layers), it reads the same text embeddings and the same latents."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ControlNetError(f"{label}: {folder} has no config.json; give a folder written by "
                              f"ControlNetModel.save_pretrained.")
    config = json.loads(config_file.read_text())
    unet = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    if config.get("_class_name") != "ControlNetModel":
        raise ControlNetError(f"{label}: {config_file} is a {config.get('_class_name')!r}, not a ControlNetModel.")
    latent_channels = json.loads((Path(model_dir) / "vae" / "config.json").read_text()).get("latent_channels", 4)
    for key, theirs, ours in (("residuals (channels, level)", residual_layout(config), residual_layout(unet)),
                              ("cross_attention_dim", config.get("cross_attention_dim"), unet.get("cross_attention_dim")),
                              ("in_channels", config.get("in_channels"), latent_channels)):
        if theirs != ours:
            raise ControlNetError(f"{label}: its {key} {theirs} does not match the checkpoint's {ours} ({model_dir}): "
                                  f"use a ControlNet trained for this checkpoint's family.")


def build_tiny_controlnet(model_dir: Path, target: Path, seed: int) -> Path:
    """A random ControlNet for the checkpoint's UNet, as diffusers starts training one
    (``ControlNetModel.from_unet``: the UNet's encoder copied), with its zero convolutions made
    random, so that it changes the image visibly."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    widths = unet.config.block_out_channels[0]
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)
                                           if widths >= 256 else (8, 8, 16, 16))
    with torch.no_grad():
        for zero_conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                          controlnet.controlnet_cond_embedding.conv_out]:
            zero_conv.weight.normal_(0, 0.02)
    if unet.dtype != torch.float32:  # the large presets' (ControlNetModel.to would warn on each module)
        controlnet.half()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        controlnet.save_pretrained(staging)
        staging.rename(target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and (target / "config.json").exists():  # built by another process meanwhile
            return target
        raise
    return target


def canny(photos: np.ndarray, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> np.ndarray:
    """uint8 [N, H, W, 3] photos -> their Canny edges as control images, white on black, the
    same [N, H, W, 3] (OpenCV on each, as diffusers' ControlNet guide makes them)."""
    import cv2

    edges = [cv2.Canny(np.ascontiguousarray(photo), *thresholds) for photo in photos]
    return np.repeat(np.stack(edges)[..., None], 3, axis=-1)
