"""LoRA adapters applied in place, per request: the torch runtime's way of serving them, one
network whose weights each request's adapters set, instead of a UNet per adapter (utils/lora.py,
docs/lora.md)."""

from __future__ import annotations

from pathlib import Path

from utils import specs
from utils.lora import ADAPTER_DIR, TEXT_ENCODER_PREFIX, UNET_PREFIX, load_adapter
from utils.request import InvalidRequest


class InPlaceAdapters:
    """LoRA adapters applied to a network's own weights in place, per request: what the torch
    runtime does instead of a UNet per adapter (the UNet's part of each file, or the text
    encoder's: ``prefix``). Each adapter's change to a layer, ``B @ A`` times its
    scaling (peft's ``get_delta_weight``), is computed once at load; a request's set of adapters
    and weights then sets each layer they touch to its base weights plus their weighted changes,
    as diffusers' ``set_adapters`` weighs them. The weights stay the same tensors, so compiled
    kernels and CUDA graphs captured on them stay valid; from a kept copy of the base weights, so
    switching A -> B -> A gives A's weights exactly, with no drift. Where the compile recipe fused
    the attention's projections first, the changes go to the fused weights (live_weight). Costs one
    copy of the targeted layers and one change per adapter and layer in the network's precision; a
    switch is a few elementwise kernels per layer. An adapter with no part for this network
    changes nothing here."""

    def __init__(self, network, files: dict[str, Path], prefix: str = UNET_PREFIX):
        import torch
        from peft.tuners.lora import LoraLayer

        for name, path in files.items():
            load_adapter(network, name, path, prefix, text_encoder_part=True)
        self.changes: dict[str, dict[str, torch.Tensor]] = {name: {} for name in files}
        with torch.no_grad():
            for module_name, module in network.named_modules():
                if isinstance(module, LoraLayer):
                    for name in files:
                        if name in module.lora_A:
                            self.changes[name][module_name] = module.get_delta_weight(name).detach().clone()
        remove_lora_layers(network)  # the plain layers again, with the base weights
        modules = dict(network.named_modules())
        touched = {module_name for changes in self.changes.values() for module_name in changes}
        self.weights = {module_name: live_weight(modules, module_name) for module_name in touched}
        self.base = {module_name: weight.detach().clone() for module_name, weight in self.weights.items()}
        self.current: tuple[tuple[str, float], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.changes)

    def apply(self, adapters: tuple[tuple[str, float], ...]) -> None:
        """Make the network's weights the base ones plus these (name, weight) adapters' changes."""
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
    """runnable_network's ``prepare``: gives the loaded network (the UNet or the text encoder,
    ``network``) the adapters named (their files in ``version_dir``/ADAPTER_DIR, where the
    repository put them), before its graphs are captured."""

    def __init__(self, version_dir: Path, names, network: str = specs.UNET.name):
        self.files = {name: Path(version_dir) / ADAPTER_DIR / f"{name}.safetensors" for name in names}
        self.network = network
        self.adapters: InPlaceAdapters | None = None

    def __call__(self, module) -> None:
        if self.files:
            prefix = TEXT_ENCODER_PREFIX if self.network == specs.TEXT_ENCODER.name else UNET_PREFIX
            self.adapters = InPlaceAdapters(getattr(module, prefix), self.files, prefix)


def remove_lora_layers(network) -> None:
    """peft's LoRA layers replaced by the layers they wrap (diffusers' unload, for any network)."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(network)
    if hasattr(network, "peft_config"):
        del network.peft_config
