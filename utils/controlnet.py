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
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from utils import specs
from utils.errors import InvalidRequest, UsageError, UserError
from utils.model_dims import ImageSizes, residual_layout
from utils.layout import parse_named
from utils.models import write_folder
from utils.request import GenerationRequest, check_image

TINY = "tiny"  # --controlnet NAME=tiny: a random ControlNet for the checkpoint, built here
# Canny's hysteresis thresholds, as diffusers' ControlNet guide makes a control image with OpenCV.
CANNY_THRESHOLDS = (100, 200)
CANNY = "canny"
CONTROL_MODES = (CANNY,)  # what a server can make a control image from a photo with
AS_SENT = "none"  # a control_mode: the control image as sent (the default)
CONTROLNETS_PARAMETER = "controlnets"  # the controlled UNet's config lists the ControlNets served under it
# A ControlNet's weight (diffusers' controlnet_conditioning_scale takes any number; past 2 its
# residuals overwhelm the UNet's own).
CONDITIONING_SCALE_RANGE = (0.0, 2.0)


def listed_controlnets(config: dict) -> tuple[str, ...]:
    """The ControlNets a controlled UNet's config lists (Triton's JSON form of it), by name."""
    listed = config.get("parameters", {}).get(CONTROLNETS_PARAMETER, {}).get("string_value", "")
    return tuple(name for name in listed.split(",") if name)


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
        return cls(*parse_named("--controlnet", text, specs.CONTROLNET.name, f"canny=lllyasviel/sd-controlnet-canny (a "
                                                                   f"ControlNetModel folder or hub id), or canny={TINY} "
                                                                   f"for a random one"))


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
        # Named by the UNet's config too: a checkpoint of another architecture in a folder of the same name gets its own.
        unet = hashlib.sha256((Path(model_dir) / "unet" / "config.json").read_bytes()).hexdigest()[:8]
        folder = Path(models_dir) / f"{Path(model_dir).name}-controlnet" / f"{controlnet.name}-{unet}"
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


def served_folders(controlnets: tuple[ServedControlNet, ...], model_dir: Path, models_dir: Path) -> dict[str, Path]:
    """Each ControlNet's folder (controlnet_folder), by the name its network is served under."""
    return {specs.controlnet_model(c.name).name: controlnet_folder(c, model_dir, models_dir) for c in controlnets}


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
    blocks, channels and layers), it reads the same text embeddings and the same latents, and it
    takes an RGB control image and returns full-size residuals (a ControlNet with
    ``global_pool_conditions``, such as SD1.5's shuffle one, averages them to one value per channel
    and is run in diffusers' guess mode: not served)."""
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
                              ("in_channels", config.get("in_channels"), latent_channels),
                              ("conditioning_channels", config.get("conditioning_channels", 3), 3),
                              ("global_pool_conditions", config.get("global_pool_conditions", False), False)):
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
    return write_folder(target, controlnet.save_pretrained, "config.json")


def canny(photos: np.ndarray, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> np.ndarray:
    """uint8 [N, H, W, 3] photos -> their Canny edges as control images, white on black, the
    same [N, H, W, 3] (OpenCV on each, as diffusers' ControlNet guide makes them)."""
    import cv2

    edges = [cv2.Canny(np.ascontiguousarray(photo), *thresholds) for photo in photos]
    return np.repeat(np.stack(edges)[..., None], 3, axis=-1)


def check_control(request: GenerationRequest, served: tuple[str, ...],
                  sizes: ImageSizes | None = None) -> GenerationRequest:
    """A request's ControlNet inputs against the ControlNets a deployment serves (``served``, by
    name): returned whole, one entry per ControlNet used, and its size the control images'."""
    extras = [t.name for t in specs.CONTROL_INPUTS if t not in (specs.CONTROLNET_NAMES, specs.CONTROL_IMAGE)]
    if not _given(request.controlnet) and request.control_image is None:
        given = [name for name in extras if _given(getattr(request, name))]
        if given:
            raise InvalidRequest(f"{given[0]}={getattr(request, given[0])!r} applies to ControlNet: use it with a "
                                 f"control_image, or leave it out.")
        return request
    if not served:
        raise InvalidRequest("control_image: this deployment serves no ControlNet; leave the ControlNet inputs out.")
    names = tuple(str(name) for name in _each(specs.CONTROLNET_NAMES.name, request.controlnet, 0, None)) or (
        served if len(served) == 1 else ())
    if not names:
        raise InvalidRequest(f"controlnet is required: this deployment serves {len(served)} ControlNets "
                             f"({', '.join(served)}); name those to use, with a control image for each.")
    for index, name in enumerate(names):
        if name not in served:
            raise InvalidRequest(f"controlnet[{index}]={name!r} is not served here: use one of {', '.join(served)}.")
    if len(set(names)) != len(names):
        raise InvalidRequest(f"controlnet={list(names)} names one twice: send each once, with its own control image.")
    if request.control_image is None:
        raise InvalidRequest(f"controlnet={list(names)} needs a control_image: one per ControlNet, uint8 [K, H, W, 3].")
    if request.image is not None or request.lora:
        what = specs.INIT_IMAGE.name if request.image is not None else specs.LORA.name
        raise InvalidRequest(f"{what} is not served with a ControlNet yet: ControlNet guides text to image with the "
                             f"base weights; leave {what} out, or the ControlNet inputs.")
    images = check_image(request.control_image, None, sizes, name=specs.CONTROL_IMAGE.name, counts=(len(names),))
    height, width = images.shape[1:3]
    for name in ("height", "width"):
        if getattr(request, name) not in (None, {"height": height, "width": width}[name]):
            raise InvalidRequest(f"{name}={getattr(request, name)!r} differs from the control image's "
                                 f"({height}x{width}): the image takes the control image's size; resize one.")
    modes = control_modes(request.control_mode, len(names))
    scales = _fractions(specs.CONTROLNET_CONDITIONING_SCALE.name, request.controlnet_conditioning_scale, len(names),
                        1.0, CONDITIONING_SCALE_RANGE)
    starts = _fractions(specs.CONTROL_GUIDANCE_START.name, request.control_guidance_start, len(names), 0.0, (0.0, 1.0))
    ends = _fractions(specs.CONTROL_GUIDANCE_END.name, request.control_guidance_end, len(names), 1.0, (0.0, 1.0))
    for index, (start, end) in enumerate(zip(starts, ends)):
        if start >= end:
            raise InvalidRequest(f"control_guidance_start[{index}]={start:g} is not before control_guidance_end"
                                 f"[{index}]={end:g}: the ControlNet acts from the first fraction of the steps to the "
                                 f"second; send a start below the end.")
    return replace(request, controlnet=names, control_image=images, control_mode=modes, height=height, width=width,
                   controlnet_conditioning_scale=scales, control_guidance_start=starts, control_guidance_end=ends)


def control_modes(modes, count: int) -> tuple[str, ...]:
    """A request's control_mode for ``count`` control images: one each, checked."""
    modes = _each(specs.CONTROL_MODE.name, modes, count, AS_SENT)
    for index, mode in enumerate(modes):
        if mode not in (AS_SENT, *CONTROL_MODES):
            raise InvalidRequest(f"{specs.CONTROL_MODE.name}[{index}]={mode!r} is not a control mode: use {AS_SENT!r} "
                                 f"(the control image as sent) or one made here from a photo: {', '.join(CONTROL_MODES)}.")
    return modes


def prepared(images: np.ndarray, modes: tuple[str, ...]) -> np.ndarray:
    """The control images as the ControlNets take them: each made from its photo where its mode
    says how (canny: the edges), as sent otherwise."""
    images = images.copy()
    for index, mode in enumerate(modes):
        if mode == CANNY:
            images[index] = canny(images[index:index + 1])[0]
    return images


def _given(value) -> bool:
    """Whether a request field was sent: a value, or a list (or array) of one or more."""
    return value is not None and (not isinstance(value, (list, tuple, np.ndarray)) or len(value) > 0)


def _each(name: str, values, count: int, default):
    """One value per ControlNet: as given, one for all, or the default (``count`` 0: any number, as given)."""
    values = list(values) if isinstance(values, (list, tuple, np.ndarray)) else [] if values is None else [values]
    if count and len(values) not in (0, 1, count):
        raise InvalidRequest(f"{name} has {len(values)} values for {count} ControlNets: send one for each, or one "
                             f"for all.")
    if count and len(values) == 1:
        return tuple(values * count)
    return tuple(values or [default] * count)


def _fractions(name: str, values, count: int, default: float, allowed: tuple[float, float]) -> tuple[float, ...]:
    numbers = _each(name, values, count, default)
    for index, value in enumerate(numbers):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
                math.isfinite(value) and allowed[0] <= value <= allowed[1]):
            raise InvalidRequest(f"{name}[{index}]={value!r} is not allowed: use a number in [{allowed[0]:g}, "
                                 f"{allowed[1]:g}].")
    return tuple(float(value) for value in numbers)
