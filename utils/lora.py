"""LoRA adapters: named in a deployment, checked before anything is written, fused into UNets of
their own; and the tiny ones the demo and the tests build.

An adapter is a LoRA file as diffusers reads it with ``load_lora_weights`` (its own format, as
``save_lora_weights`` writes it, or the Kohya/A1111 ones it converts). A deployment serves each
adapter as a UNet of its own, ``unet_<name>``: the base weights with the adapter fused in at
weight 1, as diffusers' ``fuse_lora`` does, then exported, served and built for TensorRT like the
base UNet. A request names adapters in ``lora`` (and their weights in ``lora_scale``); the loop
sends its UNet calls to the adapter's UNet, whichever way it runs (docs/lora.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from utils.errors import UsageError, UserError
from utils.layout import parse_named
from utils.request import InvalidRequest

TINY = "tiny"  # --lora NAME=tiny: a random adapter for the tiny model, built here with peft
TINY_WITH_TEXT_ENCODER = "tiny+text-encoder"  # the same, with a text encoder part too
TINY_RANK = 4
# Fused at this weight: diffusers' set_adapters default, the adapter as it was trained.
FUSED_SCALE = 1.0
UNET_PREFIX = "unet"  # the UNet's keys in a diffusers LoRA file
TEXT_ENCODER_PREFIX = "text_encoder"  # and the text encoder's
LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes
# The torch runtime applies adapters in place (InPlaceAdapters): its UNet's config names them under
# this parameter, its version folder keeps their files in ADAPTER_DIR, and a UNet call carries its
# request's adapters as the request parameter REQUEST_PARAMETER (encode_adapters).
CONFIG_PARAMETER = "lora_adapters"
ADAPTER_DIR = "lora"
REQUEST_PARAMETER = "lora"


class AdapterError(UserError, ValueError):
    """A LoRA file that does not fit the checkpoint: nothing is written."""


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter of a deployment: its served name and its file (or ``tiny``)."""

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> LoraAdapter:
        """``NAME=PATH``, as --lora takes it."""
        name, path = parse_named("--lora", text, UNET_PREFIX, f"style=loras/style.safetensors (or style={TINY} for "
                                                              f"a random adapter of the tiny model)")
        return cls(name, Path(path))


def check_names(adapters: tuple[LoraAdapter, ...]) -> None:
    names = [adapter.name for adapter in adapters]
    if len(set(names)) != len(names):
        raise UsageError(f"--lora names {names}: each adapter needs a name of its own.")


def adapter_file(adapter: LoraAdapter, model_dir: Path, models_dir: Path) -> Path:
    """The adapter's LoRA file: the one given, or the tiny one built for ``model_dir`` (seeded by
    the adapter's name, so each name has weights of its own)."""
    if str(adapter.path) not in (TINY, TINY_WITH_TEXT_ENCODER):
        if not adapter.path.is_file():
            raise AdapterError(f"--lora {adapter.name}={adapter.path}: no such file. Give a LoRA file (.safetensors, "
                               f"as diffusers' save_lora_weights writes it), or {TINY} for a random tiny adapter "
                               f"({TINY_WITH_TEXT_ENCODER}: with a text encoder part).")
        return adapter.path
    seed = int.from_bytes(hashlib.sha256(adapter.name.encode()).digest()[:4], "little")
    text_encoder = str(adapter.path) == TINY_WITH_TEXT_ENCODER
    folder = adapter.name + ("-with-text-encoder" if text_encoder else "")
    target = Path(models_dir) / f"{Path(model_dir).name}-lora" / folder / LORA_FILE
    if not target.exists():
        build_tiny_adapter(model_dir, target, seed, text_encoder=text_encoder)
    return target


def build_tiny_adapter(model_dir: Path, target: Path, seed: int, rank: int = TINY_RANK,
                       text_encoder: bool = False) -> Path:
    """A random LoRA for the UNet's attention projections (and with ``text_encoder``, the text
    encoder's), made with peft as diffusers' training scripts make one, and saved in diffusers'
    format: random B matrices (peft starts them at zero, which would change nothing), so that the
    adapter changes the image visibly."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    if text_encoder:
        encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), encoder)
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        StableDiffusionPipeline.save_lora_weights(staging, **layers, safe_serialization=True, weight_name=target.name)
        (staging / target.name).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_adapter(path: Path, text_encoder: bool = True) -> tuple[dict, dict | None]:
    """A LoRA file's weights and alphas as diffusers reads them (``lora_state_dict``), refused if
    unreadable, empty, or with parts of networks other than the UNet (and, with ``text_encoder``,
    the text encoder)."""
    from diffusers import StableDiffusionPipeline

    try:
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    except Exception as error:  # not safetensors, not a LoRA diffusers can read
        raise AdapterError(f"{path}: not a LoRA file diffusers can read ({type(error).__name__}: {error}).") from None
    parts = {key.split(".")[0] for key in state_dict}
    if TEXT_ENCODER_PREFIX in parts and not text_encoder:
        raise AdapterError(f"{path}: has text_encoder weights; the ONNX and TensorRT routes serve each adapter fused "
                           f"into a UNet of its own, and its text encoder part would need a text encoder per adapter: "
                           f"serve it with the torch runtime (--runtime torch), which applies both parts in place, or "
                           f"use a UNet-only LoRA.")
    others = sorted(parts - {UNET_PREFIX, TEXT_ENCODER_PREFIX})
    if others:
        raise AdapterError(f"{path}: has {', '.join(others)} weights, which an SD1.x pipeline has no network for "
                           f"(an SDXL LoRA?): use a LoRA trained for SD1.x.")
    if not state_dict:
        raise AdapterError(f"{path}: holds no LoRA weights.")
    return state_dict, alphas


def load_adapter(module, adapter_name: str, path: Path, prefix: str = UNET_PREFIX,
                 text_encoder_part: bool = False) -> None:
    """Load a LoRA file's part for one network, ``prefix`` (a diffusers UNet's or a transformers
    text encoder's), into ``module`` as adapter ``adapter_name``, checked: every key names a
    module of this network with the shapes the file has, and the weights are in its LoRA layers
    after. A file with no part for it loads nothing; ``text_encoder_part``: whether the file may
    have a text encoder part (where the text encoder applies it)."""
    from diffusers import StableDiffusionPipeline

    state_dict, alphas = read_adapter(path, text_encoder=text_encoder_part or prefix == TEXT_ENCODER_PREFIX)
    weights = {key: value for key, value in state_dict.items() if key.split(".")[0] == prefix}
    if not weights:
        return
    network = "UNet" if prefix == UNET_PREFIX else "text encoder"
    modules = dict(module.named_modules())
    for key in weights:
        target = key[len(prefix) + 1:].split(".lora")[0].removesuffix(".alpha")
        if target not in modules:
            raise AdapterError(f"{path}: targets {target!r}, which this checkpoint's {network} does not have: the LoRA "
                               f"was trained for another model (SD1.x adapters fit SD1.x checkpoints).")
    try:
        if prefix == UNET_PREFIX:
            module.load_lora_adapter(weights, prefix=prefix, network_alphas=alphas, adapter_name=adapter_name)
        else:
            StableDiffusionPipeline.load_lora_into_text_encoder(weights, network_alphas=alphas, text_encoder=module,
                                                                 prefix=prefix, adapter_name=adapter_name)
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise AdapterError(f"{path}: does not fit this checkpoint's {network} ({first}): the LoRA was trained for "
                           f"another model.") from None
    check_loaded(module, adapter_name, weights, path)


def check_loaded(module, adapter_name: str, state_dict: dict, path: Path) -> None:
    """That the file's weights are in the network's LoRA layers: diffusers only warns of keys it could
    not place (seen with a peft other than the pinned one: every layer left at its initial weights,
    an adapter that changes nothing). Compared as a sum of magnitudes, whatever the keys' names."""
    import math

    import diffusers
    import peft

    layers = (f".lora_A.{adapter_name}.", f".lora_B.{adapter_name}.")
    loaded = sum(float(weight.detach().float().abs().sum()) for name, weight in module.named_parameters()
                 if any(layer in name for layer in layers))
    expected = sum(float(weight.float().abs().sum()) for key, weight in state_dict.items() if "alpha" not in key)
    if not math.isclose(loaded, expected, rel_tol=1e-2):
        raise AdapterError(f"{path}: its weights did not load into the network's LoRA layers (sum of magnitudes "
                           f"{loaded:.6g}, the file's {expected:.6g}) with diffusers {diffusers.__version__} and peft "
                           f"{peft.__version__}: install the versions requirements.txt pins.")


def check_adapters(model_dir: Path, files: dict[str, Path], text_encoder: bool = False) -> None:
    """Load every adapter file into the checkpoint's UNet (and with ``text_encoder``, where the
    text encoder applies adapters too, into its text encoder), on the CPU: AdapterError for one
    that does not fit."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if files:
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder") if text_encoder else None
        for name, path in files.items():
            load_adapter(unet, name, path, text_encoder_part=text_encoder)
            if encoder is not None:
                load_adapter(encoder, name, path, TEXT_ENCODER_PREFIX)


def fused_id(adapter: LoraAdapter, model_dir: Path, models_dir: Path) -> str:
    """``<name>-<hash>``: the adapter fused into this checkpoint, named by the hash of both, so that
    a changed file gets a new fused UNet (and ONNX graph) and never overwrites the one made before."""
    path = adapter_file(adapter, model_dir, models_dir)
    digest = hashlib.sha256(path.read_bytes() + str(Path(model_dir).resolve()).encode()).hexdigest()[:12]
    return f"{adapter.name}-{digest}"


def fused_model(model_dir: Path, adapter: LoraAdapter, models_dir: Path) -> Path:
    """A diffusers folder like ``model_dir`` whose UNet has the adapter fused in at FUSED_SCALE
    (its configs, tokenizer and scheduler copied; no other weights): what the repository exports
    and serves as ``unet_<name>``. Written once per checkpoint and adapter file (fused_id)."""
    from diffusers import UNet2DConditionModel

    from utils.repository.writer import pipeline_files  # noqa: I001  (the writer imports this module)

    path = adapter_file(adapter, model_dir, models_dir)
    target = Path(models_dir) / f"{Path(model_dir).name}-lora-{fused_id(adapter, model_dir, models_dir)}"
    if target.exists():
        return target
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    load_adapter(unet, adapter.name, path)
    unet.fuse_lora(lora_scale=FUSED_SCALE, adapter_names=[adapter.name])
    unet.unload_lora()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        for source in pipeline_files(Path(model_dir)):
            (staging / source.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, staging / source.relative_to(model_dir))
        unet.save_pretrained(staging / "unet")
        (staging / "lora.json").write_text(json.dumps({"adapter": adapter.name, "file": str(path),
                                                       "base": str(model_dir), "scale": FUSED_SCALE}, indent=2) + "\n")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@dataclass(frozen=True)
class ServedAdapters:
    """The adapters a deployment serves, as the pipelines check a request against them and route
    its UNet calls. Fused (the ONNX and TensorRT routes): each a UNet of its own with the adapter
    at FUSED_SCALE, so one adapter per request, at that weight. In place (the torch runtime): the
    UNet applies any mix of them at any weights per request. ``names``: as the repository recorded
    them; ``served``: asks the server instead (a client, which cannot read the repository)."""

    names: tuple[str, ...] = ()
    served: Callable[[str], bool] | None = None
    in_place: bool = False

    def route(self, adapters: tuple[tuple[str, float], ...], network: str = UNET_PREFIX) -> tuple[str | None, dict]:
        """Where a call of ``network`` (the UNet or the text encoder) with these (name, weight)
        adapters goes: the adapter whose fused UNet serves it (None: the network itself), and the
        request parameters it carries. In place, both networks apply the adapters; fused, only
        the UNet has them (files with a text encoder part are served in place only)."""
        if not adapters:
            return None, {}
        if self.in_place:
            return None, {REQUEST_PARAMETER: encode_adapters(adapters)}
        if network != UNET_PREFIX:
            return None, {}
        ((name, _),) = adapters
        return name, {}

    def check(self, lora: tuple[str, ...], lora_scale: tuple[float, ...] | None) -> None:
        for name in lora:
            if self.served is not None and not self.served(name):
                raise InvalidRequest(f"lora={name!r} is not served: the server has no unet_{name} (its deployment's "
                                     f"--lora NAME=PATH adds adapters).")
            if self.served is None and name not in self.names:
                available = ", ".join(self.names) or "none (the deployment's --lora NAME=PATH adds them)"
                raise InvalidRequest(f"lora={name!r} is not served: the adapters here are {available}.")
        if self.in_place:  # any mix, any weight the request checks allow
            return
        if len(lora) > 1:
            raise InvalidRequest(f"lora={list(lora)}: this deployment serves each adapter fused into a UNet of its own, "
                                 f"one adapter per request; ask for one (to mix adapters, serve them with the torch "
                                 f"runtime, which applies them in place, or fuse the mix into one LoRA file).")
        if lora_scale is not None and any(scale != FUSED_SCALE for scale in lora_scale):
            raise InvalidRequest(f"lora_scale={list(lora_scale)}: the adapters here are fused at weight "
                                 f"{FUSED_SCALE:g}; leave lora_scale out or send {FUSED_SCALE:g} (other weights: serve "
                                 f"them with the torch runtime, which applies them in place).")


def encode_adapters(adapters: tuple[tuple[str, float], ...]) -> str:
    """A request's adapters as one request parameter (Triton's take bool, int or str):
    ``name:weight,name:weight``, the weights written exactly (repr of a float)."""
    return ",".join(f"{name}:{scale!r}" for name, scale in adapters)


def decode_adapters(text: str) -> tuple[tuple[str, float], ...]:
    pairs = [item.rpartition(":") for item in text.split(",") if item]
    return tuple((name, float(scale)) for name, _, scale in pairs)
