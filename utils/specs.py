"""The one source of truth for every tensor the project serves.

Each Triton model owns its input/output names, dtypes, non-batch dims and batch profile here.
The ONNX export (``input_names``/``dynamic_axes``), the trtexec shape flags, every config.pbtxt,
the BLS model and the clients all read these objects; no other file types a tensor name.

Sizes are symbolic ("text_length", "latent_height", ...) and resolved against ``ModelDims``,
which is read from the model's own config files, so SD1.5 gets 77 tokens, 768 features and
64x64 latents while the tiny preset gets its own smaller sizes through the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

# Float activations are FP16 in GPU engines and FP32 for the CPU default: a spec says
# ACTIVATION and the precision is chosen when the network is exported.
ACTIVATION = "ACTIVATION"
PRECISIONS = ("FP32", "FP16")
ONNX_FLOAT_PRECISIONS = {"FLOAT": "FP32", "FLOAT16": "FP16"}  # ONNX's element type names

BATCH_AXIS = "batch"

Dim = Union[int, str]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type without the TYPE_ prefix, or ACTIVATION
    dims: tuple[Dim, ...]  # without the batch dim; str = symbol resolved by ModelDims, -1 = any
    optional: bool = False

    def resolved_dtype(self, precision: str) -> str:
        return precision if self.dtype == ACTIVATION else self.dtype

    @property
    def wire_dims(self) -> tuple[Dim, ...]:
        """Triton needs at least one dim: a per-sample scalar travels as [batch, 1], and the
        config's ``reshape`` hands it to the model as [batch], the shape it was exported with."""
        return self.dims or (1,)

    def to_wire(self, batched):
        """Reshape a batched tensor (torch or numpy) from the model's shape to the wire shape."""
        return batched if self.dims else batched.reshape(-1, 1)


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimization profile on the network's own batch dimension (min/opt/max)."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class NetworkSpec:
    """One exported network, served as one Triton model with a batch dimension."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: BatchProfile
    # Classifier-free guidance: the text encoder and the UNet see the unconditional and the
    # conditional rows together, unconditional first, so their batch is 2x the prompt batch.
    cfg_doubled: bool = False

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {0: BATCH_AXIS} for t in self.tensors}

    def shape(self, tensor: TensorSpec, batch: int, dims: ModelDims) -> tuple[int, ...]:
        return (batch, *dims.resolve(tensor.dims))

    def input_shapes(self, batch: int, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        return {t.name: self.shape(t, batch, dims) for t in self.inputs}

    def max_prompts(self) -> int:
        """How many prompts one call of this network can take at most."""
        return self.profile.max // (2 if self.cfg_doubled else 1)


@dataclass(frozen=True)
class ModelDims:
    """The sizes a Stable Diffusion checkpoint fixes, read from its config files."""

    text_length: int  # tokens per prompt (77 for SD1.5)
    text_hidden: int  # text encoder features (768)
    latent_channels: int  # 4
    latent_height: int  # 64 for 512x512
    latent_width: int
    vae_scale_factor: int  # image size / latent size (8)

    @property
    def image_height(self) -> int:
        return self.latent_height * self.vae_scale_factor

    @property
    def image_width(self) -> int:
        return self.latent_width * self.vae_scale_factor

    @property
    def latent_parameters(self) -> int:
        return 2 * self.latent_channels  # the VAE encoder's mean and log-variance

    def resolve(self, dims: tuple[Dim, ...]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else getattr(self, d) for d in dims)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelDims:
        """Read the sizes from a diffusers folder's config files (no weights are loaded)."""
        model_dir = Path(model_dir)

        def config(sub: str) -> dict:
            return json.loads((model_dir / sub / "config.json").read_text())

        text, unet, vae = config("text_encoder"), config("unet"), config("vae")
        tokenizer_config = json.loads((model_dir / "tokenizer" / "tokenizer_config.json").read_text())
        latent = unet["sample_size"]
        return cls(
            text_length=min(tokenizer_config["model_max_length"], text["max_position_embeddings"]),
            text_hidden=text["hidden_size"],
            latent_channels=unet["in_channels"],
            latent_height=latent,
            latent_width=latent,
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        )


TEXT_ENCODER = NetworkSpec(
    name="text_encoder",
    inputs=(TensorSpec("input_ids", "INT32", ("text_length",)),),
    outputs=(TensorSpec("last_hidden_state", ACTIVATION, ("text_length", "text_hidden")),),
    # Up to 16: the served UNet and text encoder batch several requests together (dynamic
    # batching), 8 prompts with their unconditional rows; one request sends at most max_prompts().
    profile=BatchProfile(1, 2, 16),
    cfg_doubled=True,
)

UNET = NetworkSpec(
    name="unet",
    inputs=(
        TensorSpec("sample", ACTIVATION, ("latent_channels", "latent_height", "latent_width")),
        # One FP32 timestep per sample: requests at different steps can share one batched call,
        # and FP16 would round the fractional timesteps of Euler/LMS-type schedulers.
        TensorSpec("timestep", "FP32", ()),
        TensorSpec("encoder_hidden_states", ACTIVATION, ("text_length", "text_hidden")),
    ),
    outputs=(TensorSpec("outputs", ACTIVATION, ("latent_channels", "latent_height", "latent_width")),),
    profile=BatchProfile(1, 2, 16),
    cfg_doubled=True,
)

VAE_ENCODER = NetworkSpec(
    name="vae_encoder",
    inputs=(TensorSpec("image", ACTIVATION, (3, "image_height", "image_width")),),
    outputs=(
        TensorSpec("latent_parameters", ACTIVATION, ("latent_parameters", "latent_height", "latent_width")),
    ),
    profile=BatchProfile(1, 1, 4),
)

VAE_DECODER = NetworkSpec(
    name="vae_decoder",
    inputs=(TensorSpec("sample", ACTIVATION, ("latent_channels", "latent_height", "latent_width")),),
    outputs=(TensorSpec("image", ACTIVATION, (3, "image_height", "image_width")),),
    profile=BatchProfile(1, 1, 4),
)

NETWORKS = {spec.name: spec for spec in (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)}


@dataclass(frozen=True)
class PipelineSpec:
    """A Python-backend pipeline model: no batch dimension, one request = one generation."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    networks: tuple[NetworkSpec, ...]  # the component models it calls

    def max_prompts(self) -> int:
        return min(network.max_prompts() for network in self.networks)


TEXT_TO_IMAGE = PipelineSpec(
    name="pipeline_text_to_image",
    inputs=(
        TensorSpec("prompt", "BYTES", (-1,)),
        TensorSpec("negative_prompt", "BYTES", (-1,), optional=True),
        TensorSpec("guidance_scale", "FP32", (1,), optional=True),
        TensorSpec("num_inference_steps", "INT32", (1,), optional=True),
        TensorSpec("seed", "INT64", (1,), optional=True),
    ),
    outputs=(TensorSpec("image", "UINT8", (-1, -1, -1, 3)),),  # [N, H, W, RGB]
    networks=(TEXT_ENCODER, UNET, VAE_DECODER),
)

PIPELINES = {spec.name: spec for spec in (TEXT_TO_IMAGE,)}
