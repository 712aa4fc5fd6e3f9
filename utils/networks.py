"""The four networks as torch modules whose signature is their spec.

Each wrapper's ``forward`` takes the spec's inputs in order and returns its outputs in order,
so ``torch.onnx.export`` and the GPU runtime can treat every network the same way.
``for_export()`` switches a wrapper to what exports cleanly where that differs from what runs fastest.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from utils import families, specs
from utils.layout import network_of


class _Network(nn.Module):
    def for_export(self) -> nn.Module:
        return self


class TextEncoder(_Network):
    spec = specs.TEXT_ENCODER
    subfolder = "text_encoder"  # of the diffusers checkpoint

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        model_class = CLIPTextModelWithProjection if self.spec is families.TEXT_ENCODER_2 else CLIPTextModel
        self.text_encoder = model_class.from_pretrained(model_dir, subfolder=self.subfolder, dtype=dtype)
        # SD1.x conditions on the last layer's output, SDXL on the one before (utils/families.py)
        self.offset = families.family_of(specs.ModelDims.from_pretrained(model_dir)).hidden_state_offset

    def forward(self, input_ids, attention_mask, skipped_layers):
        """SD1.x: the last hidden state where skipped_layers is 0; else the output of the layer that
        many before the last, through the final layer norm (diffusers' clip_skip), chosen per row.
        SDXL: the output of the layer 1 + skipped_layers before the last, as it is."""
        output = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        states = output.hidden_states
        stacked = torch.stack(states, dim=1)  # [rows, 1 + layers, tokens, features]: the embeddings, then each layer
        layer = len(states) - 1 - self.offset - skipped_layers.long()
        chosen = stacked[torch.arange(stacked.shape[0], device=stacked.device), layer]
        if not self.offset:
            # (transformers 5's CLIPTextModel holds its final layer norm itself, where 4's text_model did)
            chosen = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm(chosen)
        return (chosen, output.text_embeds) if self.spec is families.TEXT_ENCODER_2 else chosen

    def for_export(self) -> nn.Module:
        # transformers' eager attention: torch's TorchScript exporter turns SDPA with is_causal into
        # an FP32 mask added to the scores, so an FP16 graph mixes FP32 and FP16 inputs of one
        # operator, which ONNX Runtime and TensorRT refuse. Served as torch, SDPA stays (faster).
        self.text_encoder.set_attn_implementation("eager")
        return self

    def example_inputs(self, batch: int, dims: specs.ModelDims, generator: torch.Generator):
        vocab, layers = self.text_encoder.config.vocab_size, self.text_encoder.config.num_hidden_layers
        ids = torch.randint(0, vocab, (batch, dims.text_length), generator=generator, dtype=torch.int32)
        mask = (torch.rand(batch, dims.text_length, generator=generator) > 0.2).to(torch.int32)  # some masked out
        mask[:, 0] = 1  # (as compel masks: never the BOS)
        return ids, mask, torch.randint(0, layers, (batch,), generator=generator, dtype=torch.int32)


class TextEncoder2(TextEncoder):
    """SDXL's second text encoder (utils/families.py): its hidden state, and its pooled output projected."""

    spec = families.TEXT_ENCODER_2
    subfolder = "text_encoder_2"


class UNet(_Network):
    spec = specs.UNET
    subfolder = "unet"  # of the diffusers checkpoint

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=dtype)
        if self.spec is specs.UNET:  # an SDXL checkpoint's takes the added conditions: its family's contract
            self.spec = families.family_of(specs.ModelDims.from_pretrained(model_dir)).unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = None if time_ids is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]

    def for_export(self) -> nn.Module:
        # diffusers up-samples by a fixed factor of 2 when the latents divide by every
        # down-sampling (a multiple of 64 pixels for SD1.5), and to the size of the skip connection
        # otherwise. The trace keeps only the path it took: make it take the second, which reads
        # the sizes from the tensors, so the graph serves every multiple of 8 pixels.
        self.unet.num_upsamplers = 32  # 2**32 divides no latent size (and fits an int64)
        return self

    def example_inputs(self, batch: int, dims: specs.ModelDims, generator: torch.Generator):
        sample, _, hidden = (random_input(self.spec, t, batch, dims, generator) for t in self.spec.inputs[:3])
        timestep = torch.randint(0, 1000, (batch,), generator=generator).float()
        if families.TIME_IDS not in self.spec.inputs:
            return sample, timestep, hidden
        # SDXL's pooled text, and its time ids: sizes in pixels (the refiner's last one an aesthetic score)
        pooled = random_input(self.spec, families.TEXT_EMBEDS, batch, dims, generator)
        ids = torch.randint(0, 1024, self.spec.shape(families.TIME_IDS, batch, dims), generator=generator).float()
        return sample, timestep, hidden, pooled, ids


class RefinerUNet(UNet):
    """SDXL's refiner's UNet, served beside the base's (the refiner checkpoint's folder is given)."""

    spec = families.REFINER_UNET


class ControlledUNet(UNet):
    """The UNet with a ControlNet's residuals added, given packed as the ControlNet returns them."""

    spec = specs.CONTROLLED_UNET

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        super().__init__(model_dir, dtype)
        self.layout = specs.ModelDims.from_pretrained(model_dir).residual_layout

    def forward(self, sample, timestep, encoder_hidden_states, residuals):
        *down, mid = unpack_residuals(residuals, self.layout, sample.shape[2], sample.shape[3])
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    def example_inputs(self, batch: int, dims: specs.ModelDims, generator: torch.Generator):
        residuals = random_input(self.spec, self.spec.inputs[3], batch, dims, generator)
        return (*super().example_inputs(batch, dims, generator), residuals)


class ControlNet(_Network):
    """A ControlNet; its residuals packed into one tensor (pack_residuals), at conditioning scale
    1: the loop weights them."""

    spec = specs.CONTROLNET
    # The ControlNet's own folder (ControlNetModel.save_pretrained's) is given, or a checkpoint
    # folder that holds it here, beside the UNet (the torch runtime's copy).
    subfolder = "controlnet"

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        super().__init__()
        from diffusers import ControlNetModel

        inside = model_dir / self.subfolder
        self.controlnet = ControlNetModel.from_pretrained(inside if inside.is_dir() else model_dir, dtype=dtype)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, return_dict=False)
        return pack_residuals((*down, mid))

    def example_inputs(self, batch: int, dims: specs.ModelDims, generator: torch.Generator):
        sample, _, hidden, image = (random_input(self.spec, t, batch, dims, generator) for t in self.spec.inputs)
        timestep = torch.randint(0, 1000, (batch,), generator=generator).float()
        return sample, timestep, hidden, image.uniform_(0, 1, generator=generator)


def pack_residuals(residuals) -> torch.Tensor:
    """A ControlNet's residuals [N, C, h', w'] each -> [N, residual_values], in order."""
    return torch.cat([r.flatten(1) for r in residuals], dim=1)


def unpack_residuals(packed: torch.Tensor, layout, height, width) -> list[torch.Tensor]:
    """The inverse, for latents of ``height`` x ``width``: (channels, level) of each in ``layout``
    (ModelDims.residual_layout). The sizes are computed from the latents' own, so that an exported
    graph reads them from its inputs at any size (rounded up by adding first: ONNX's integer
    division truncates, so the floor of a negative number would not survive the export)."""
    residuals, start = [], 0
    for channels, level in layout:
        size_h, size_w = (height + 2 ** level - 1) // 2 ** level, (width + 2 ** level - 1) // 2 ** level
        end = start + channels * size_h * size_w
        residuals.append(packed[:, start:end].reshape(-1, channels, size_h, size_w))
        start = end
    return residuals


class _Vae(_Network):
    """One half of the AutoencoderKL; both halves take random float inputs."""
    subfolder = "vae"  # of the diffusers checkpoint

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=dtype)

    def example_inputs(self, batch: int, dims: specs.ModelDims, generator: torch.Generator):
        return tuple(random_input(self.spec, t, batch, dims, generator) for t in self.spec.inputs)


class VaeEncoder(_Vae):
    spec = specs.VAE_ENCODER

    def forward(self, image):
        # The distribution's parameters (mean, logvar), not a sample: the pipeline samples with its
        # own seeded generator, because noise traced into the graph would be frozen.
        return self.vae.encode(image, return_dict=False)[0].parameters


class VaeDecoder(_Vae):
    spec = specs.VAE_DECODER

    def forward(self, sample):
        # Unscaled latents in: the pipeline divides by vae.config.scaling_factor, as diffusers does.
        return self.vae.decode(sample, return_dict=False)[0]


WRAPPERS = {wrapper.spec.name: wrapper for wrapper in (TextEncoder, TextEncoder2, UNet, RefinerUNet, VaeEncoder,
                                                       VaeDecoder, ControlNet, ControlledUNet)}

TORCH_DTYPES = {"FP32": torch.float32, "FP16": torch.float16, "INT32": torch.int32, "INT64": torch.int64}


def torch_dtype(tensor: specs.TensorSpec, precision_dtype: torch.dtype) -> torch.dtype:
    """Float activations at the served precision; the other tensors at their spec's dtype."""
    return precision_dtype if tensor.dtype == specs.ACTIVATION else TORCH_DTYPES[tensor.dtype]


def run_in_chunks(network, inputs: list[torch.Tensor], max_batch: int) -> torch.Tensor:
    """A network called on more rows than its profile takes: ``max_batch`` rows at a time, the
    outputs joined (the torch runtime's batch of requests, the in-process UNet's batch of steps)."""
    chunks = [network(*[t[start:start + max_batch] for t in inputs]) for start in range(0, inputs[0].shape[0], max_batch)]
    if isinstance(chunks[0], tuple):  # a network of several outputs (SDXL's second text encoder)
        return tuple(torch.cat(parts) for parts in zip(*chunks))
    return torch.cat(chunks)


def random_input(spec: specs.NetworkSpec, tensor: specs.TensorSpec, batch: int, dims: specs.ModelDims,
                 generator: torch.Generator) -> torch.Tensor:
    return torch.randn(spec.shape(tensor, batch, dims), generator=generator)


def load_network(name: str, model_dir: str | Path, precision: str = "FP32", device: str = "cpu",
                 for_export: bool = False) -> nn.Module:
    """The named network (or a served name of it: ``controlnet_<name>``) of a diffusers folder (a
    ControlNet's: its own folder), in eval mode, on ``device`` at ``precision``."""
    module = WRAPPERS[network_of(name)](Path(model_dir), TORCH_DTYPES[precision]).to(device).eval()
    return module.for_export() if for_export else module
