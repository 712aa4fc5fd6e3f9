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
from utils.request import LORA_NAME, InvalidRequest

TINY = "tiny"  # --lora NAME=tiny: a random adapter for the tiny model, built here with peft
TINY_RANK = 4
# Fused at this weight: diffusers' set_adapters default, the adapter as it was trained.
FUSED_SCALE = 1.0
UNET_PREFIX = "unet"  # the UNet's keys in a diffusers LoRA file
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
        name, separator, path = text.partition("=")
        if not separator or not path:
            raise UsageError(f"--lora {text!r}: give NAME=PATH, e.g. --lora style=loras/style.safetensors "
                             f"(or NAME={TINY} for a random adapter of the tiny model).")
        if not LORA_NAME.match(name):
            raise UsageError(f"--lora {text!r}: the name {name!r} is served as unet_{name}; use lower-case letters, "
                             f"digits and dashes (at most 40), starting with a letter or digit.")
        return cls(name, Path(path))


def check_names(adapters: tuple[LoraAdapter, ...]) -> None:
    names = [adapter.name for adapter in adapters]
    if len(set(names)) != len(names):
        raise UsageError(f"--lora names {names}: each adapter needs a name of its own.")


def adapter_file(adapter: LoraAdapter, model_dir: Path, models_dir: Path) -> Path:
    """The adapter's LoRA file: the one given, or the tiny one built for ``model_dir`` (seeded by
    the adapter's name, so each name has weights of its own)."""
    if str(adapter.path) != TINY:
        if not adapter.path.is_file():
            raise AdapterError(f"--lora {adapter.name}={adapter.path}: no such file. Give a LoRA file (.safetensors, "
                               f"as diffusers' save_lora_weights writes it), or {TINY} for a random tiny adapter.")
        return adapter.path
    seed = int.from_bytes(hashlib.sha256(adapter.name.encode()).digest()[:4], "little")
    target = Path(models_dir) / f"{Path(model_dir).name}-lora" / adapter.name / LORA_FILE
    if not target.exists():
        build_tiny_adapter(model_dir, target, seed)
    return target


def build_tiny_adapter(model_dir: Path, target: Path, seed: int, rank: int = TINY_RANK) -> Path:
    """A random LoRA for the UNet's attention projections, made with peft as diffusers' training
    scripts make one, and saved in diffusers' format: random B matrices (peft starts them at zero,
    which would change nothing), so that the adapter changes the image visibly."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        StableDiffusionPipeline.save_lora_weights(staging, unet_lora_layers=layers, safe_serialization=True,
                                                  weight_name=target.name)
        (staging / target.name).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_adapter(unet, adapter_name: str, path: Path) -> None:
    """Load a LoRA file into a diffusers UNet as adapter ``adapter_name``, checked: every key names
    a module of this UNet with the shapes the file has, and the file has no text encoder part."""
    from diffusers import StableDiffusionPipeline

    try:
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    except Exception as error:  # not safetensors, not a LoRA diffusers can read
        raise AdapterError(f"{path}: not a LoRA file diffusers can read ({type(error).__name__}: {error}).") from None
    others = sorted({key.split(".")[0] for key in state_dict} - {UNET_PREFIX})
    if others:
        raise AdapterError(f"{path}: has {', '.join(others)} weights; adapters are served for the UNet only here "
                           f"(its text encoder part would need a text encoder per adapter): use a UNet-only LoRA.")
    if not state_dict:
        raise AdapterError(f"{path}: holds no LoRA weights.")
    modules = dict(unet.named_modules())
    for key in state_dict:
        module = key[len(UNET_PREFIX) + 1:].split(".lora")[0].removesuffix(".alpha")
        if module not in modules:
            raise AdapterError(f"{path}: targets {module!r}, which this checkpoint's UNet does not have: the LoRA was "
                               f"trained for another model (SD1.x adapters fit SD1.x checkpoints).")
    try:
        unet.load_lora_adapter(state_dict, prefix=UNET_PREFIX, network_alphas=alphas, adapter_name=adapter_name)
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise AdapterError(f"{path}: does not fit this checkpoint's UNet ({first}): the LoRA was trained for "
                           f"another model.") from None
    check_loaded(unet, adapter_name, state_dict, path)


def check_loaded(unet, adapter_name: str, state_dict: dict, path: Path) -> None:
    """That the file's weights are in the UNet's LoRA layers: diffusers only warns of keys it could
    not place (seen with a peft other than the pinned one: every layer left at its initial weights,
    an adapter that changes nothing). Compared as a sum of magnitudes, whatever the keys' names."""
    import math

    import diffusers
    import peft

    layers = (f".lora_A.{adapter_name}.", f".lora_B.{adapter_name}.")
    loaded = sum(float(weight.detach().float().abs().sum()) for name, weight in unet.named_parameters()
                 if any(layer in name for layer in layers))
    expected = sum(float(weight.float().abs().sum()) for key, weight in state_dict.items() if "alpha" not in key)
    if not math.isclose(loaded, expected, rel_tol=1e-2):
        raise AdapterError(f"{path}: its weights did not load into the UNet's LoRA layers (sum of magnitudes "
                           f"{loaded:.6g}, the file's {expected:.6g}) with diffusers {diffusers.__version__} and peft "
                           f"{peft.__version__}: install the versions requirements.txt pins.")


def check_adapters(model_dir: Path, files: dict[str, Path]) -> None:
    """Load every adapter file into the checkpoint's UNet (on the CPU): AdapterError for one that
    does not fit."""
    from diffusers import UNet2DConditionModel

    if files:
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        for name, path in files.items():
            load_adapter(unet, name, path)


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

    def route(self, adapters: tuple[tuple[str, float], ...]) -> tuple[str | None, dict[str, str]]:
        """Where a UNet call with these (name, weight) adapters goes: the adapter whose fused UNet
        serves it (None: the UNet itself), and the request parameters it carries."""
        if not adapters:
            return None, {}
        if self.in_place:
            return None, {REQUEST_PARAMETER: encode_adapters(adapters)}
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


class InPlaceAdapters:
    """LoRA adapters applied to a UNet's own weights in place, per request: what the torch runtime
    does instead of a UNet per adapter. Each adapter's change to a layer, ``B @ A`` times its
    scaling (peft's ``get_delta_weight``), is computed once at load; a request's set of adapters
    and weights then sets each layer they touch to its base weights plus their weighted changes,
    as diffusers' ``set_adapters`` weighs them. The weights stay the same tensors, so compiled
    kernels and CUDA graphs captured on them stay valid; from a kept copy of the base weights, so
    switching A -> B -> A gives A's weights exactly, with no drift. Where the compile recipe fused
    the attention's projections first, the changes go to the fused weights (live_weight). Costs one copy of the targeted
    layers and one change per adapter and layer in the UNet's precision; a switch is a few
    elementwise kernels per layer."""

    def __init__(self, unet, files: dict[str, Path]):
        import torch
        from peft.tuners.lora import LoraLayer

        for name, path in files.items():
            load_adapter(unet, name, path)
        self.changes: dict[str, dict[str, torch.Tensor]] = {name: {} for name in files}
        with torch.no_grad():
            for module_name, module in unet.named_modules():
                if isinstance(module, LoraLayer):
                    for name in files:
                        if name in module.lora_A:
                            self.changes[name][module_name] = module.get_delta_weight(name).detach().clone()
        unet.unload_lora()  # the plain layers again, with the base weights
        modules = dict(unet.named_modules())
        touched = {module_name for changes in self.changes.values() for module_name in changes}
        self.weights = {module_name: live_weight(modules, module_name) for module_name in touched}
        self.base = {module_name: weight.detach().clone() for module_name, weight in self.weights.items()}
        self.current: tuple[tuple[str, float], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.changes)

    def apply(self, adapters: tuple[tuple[str, float], ...]) -> None:
        """Make the UNet's weights the base ones plus these (name, weight) adapters' changes."""
        import torch

        adapters = tuple((name, float(scale)) for name, scale in adapters if scale != 0)
        if adapters == self.current:
            return
        unknown = [name for name, _ in adapters if name not in self.changes]
        if unknown:
            raise InvalidRequest(f"lora={unknown} is not served: the adapters here are {', '.join(self.names)}.")
        touched = {module_name for name, _ in self.current + adapters for module_name in self.changes[name]}
        with torch.no_grad():
            for module_name in touched:
                weight = self.weights[module_name]
                weight.copy_(self.base[module_name])
                for name, scale in adapters:
                    change = self.changes[name].get(module_name)
                    if change is not None:
                        weight.add_(change, alpha=scale)
        self.current = adapters


def live_weight(modules: dict, module_name: str):
    """The weight a layer's forward reads: its own, or, where diffusers fused the attention's
    projections (``fuse_qkv_projections``, the compile recipe), its rows of the fused one (a view:
    changed in place, the fused projection changes). A self-attention's q, k and v are ``to_qkv``,
    a cross-attention's k and v ``to_kv``, in that order."""
    parent_name, _, leaf = module_name.rpartition(".")
    parent = modules.get(parent_name)
    if getattr(parent, "fused_projections", False):
        for fused, order in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
            if hasattr(parent, fused) and leaf in order:
                rows = modules[module_name].weight.shape[0]
                start = order.index(leaf) * rows
                return getattr(parent, fused).weight[start:start + rows]
    return modules[module_name].weight


class InPlaceLoader:
    """runnable_network's ``prepare``: gives the loaded UNet the adapters named (their files in
    ``version_dir``/ADAPTER_DIR, where the repository put them), before its graphs are captured."""

    def __init__(self, version_dir: Path, names):
        self.files = {name: Path(version_dir) / ADAPTER_DIR / f"{name}.safetensors" for name in names}
        self.adapters: InPlaceAdapters | None = None

    def __call__(self, module) -> None:
        if self.files:
            self.adapters = InPlaceAdapters(module.unet, self.files)


def encode_adapters(adapters: tuple[tuple[str, float], ...]) -> str:
    """A request's adapters as one request parameter (Triton's take bool, int or str):
    ``name:weight,name:weight``, the weights written exactly (repr of a float)."""
    return ",".join(f"{name}:{scale!r}" for name, scale in adapters)


def decode_adapters(text: str) -> tuple[tuple[str, float], ...]:
    pairs = [item.rpartition(":") for item in text.split(",") if item]
    return tuple((name, float(scale)) for name, _, scale in pairs)
