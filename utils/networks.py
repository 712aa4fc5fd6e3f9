"""The four networks as torch modules whose signature is their spec.

Each wrapper's ``forward`` takes the spec's inputs in order and returns its outputs in order,
so ``torch.onnx.export`` and the GPU runtime can treat every network the same way.
``for_export()`` switches a wrapper to what exports cleanly where that differs from what runs fastest.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from utils import specs


class _Network(nn.Module):
    def for_export(self) -> nn.Module:
        return self


class TextEncoder(_Network):
    spec = specs.TEXT_ENCODER
    subfolder = "text_encoder"  # of the diffusers checkpoint

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        super().__init__()
        from transformers import CLIPTextModel

        self.text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=dtype)

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]

    def for_export(self) -> nn.Module:
        # transformers' eager attention: torch's TorchScript exporter turns SDPA with is_causal into
        # an FP32 mask added to the scores, so an FP16 graph mixes FP32 and FP16 inputs of one
        # operator, which ONNX Runtime and TensorRT refuse. Served as torch, SDPA stays (faster).
        self.text_encoder.set_attn_implementation("eager")
        return self

    def example_inputs(self, batch: int, dims: specs.ModelDims, generator: torch.Generator):
        vocab = self.text_encoder.config.vocab_size
        return (torch.randint(0, vocab, (batch, dims.text_length), generator=generator, dtype=torch.int32),)


class UNet(_Network):
    spec = specs.UNET
    subfolder = "unet"  # of the diffusers checkpoint

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=dtype)

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    def for_export(self) -> nn.Module:
        # diffusers up-samples by a fixed factor of 2 when the latents divide by every
        # down-sampling (a multiple of 64 pixels for SD1.5), and to the size of the skip connection
        # otherwise. The trace keeps only the path it took: make it take the second, which reads
        # the sizes from the tensors, so the graph serves every multiple of 8 pixels.
        self.unet.num_upsamplers = 32  # 2**32 divides no latent size (and fits an int64)
        return self

    def example_inputs(self, batch: int, dims: specs.ModelDims, generator: torch.Generator):
        sample, _, hidden = (random_input(self.spec, t, batch, dims, generator) for t in self.spec.inputs)
        timestep = torch.randint(0, 1000, (batch,), generator=generator).float()
        return sample, timestep, hidden


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


WRAPPERS = {wrapper.spec.name: wrapper for wrapper in (TextEncoder, UNet, VaeEncoder, VaeDecoder)}

TORCH_DTYPES = {"FP32": torch.float32, "FP16": torch.float16, "INT32": torch.int32, "INT64": torch.int64}


def torch_dtype(tensor: specs.TensorSpec, precision_dtype: torch.dtype) -> torch.dtype:
    """Float activations at the served precision; the other tensors at their spec's dtype."""
    return precision_dtype if tensor.dtype == specs.ACTIVATION else TORCH_DTYPES[tensor.dtype]


def run_in_chunks(network, inputs: list[torch.Tensor], max_batch: int) -> torch.Tensor:
    """A network called on more rows than its profile takes: ``max_batch`` rows at a time, the
    outputs joined (the torch runtime's batch of requests, the in-process UNet's batch of steps)."""
    return torch.cat([network(*[t[start:start + max_batch] for t in inputs])
                      for start in range(0, inputs[0].shape[0], max_batch)])


def random_input(spec: specs.NetworkSpec, tensor: specs.TensorSpec, batch: int, dims: specs.ModelDims,
                 generator: torch.Generator) -> torch.Tensor:
    return torch.randn(spec.shape(tensor, batch, dims), generator=generator)


def load_network(name: str, model_dir: str | Path, precision: str = "FP32", device: str = "cpu",
                 for_export: bool = False) -> nn.Module:
    """The named network of a diffusers folder, in eval mode, on ``device`` at ``precision``."""
    module = WRAPPERS[name](Path(model_dir), TORCH_DTYPES[precision]).to(device).eval()
    return module.for_export() if for_export else module
