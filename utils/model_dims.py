"""The sizes a Stable Diffusion checkpoint fixes (``ModelDims``, read from its config files) and
the image sizes a deployment serves (``ImageSizes``); the specs (utils/specs.py) resolve every
tensor's symbolic dims ("text_length", "latent_height", ...) against them."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

# The sizes that follow the request: the image's (ImageSizes) and the prompt's length in tokens
# (a long prompt is encoded in chunks of text_length tokens, joined: up to MAX_PROMPT_CHUNKS).
# Dynamic axes of the graphs, -1 in the configs, a range in TensorRT's optimization profiles.
DYNAMIC = ("latent_height", "latent_width", "image_height", "image_width", "residual_values", "prompt_length")
MAX_PROMPT_CHUNKS = 3  # SD1.5: prompts of up to 3 x 75 tokens (each chunk of 77 holds its own BOS and EOS)

Dim = Union[int, str]


@dataclass(frozen=True)
class ModelDims:
    """The sizes a Stable Diffusion checkpoint fixes, read from its config files."""

    text_length: int  # tokens per prompt (77 for SD1.5)
    text_hidden: int  # text encoder features (768)
    latent_channels: int  # 4
    latent_height: int  # 64 for 512x512
    latent_width: int
    vae_scale_factor: int  # image size / latent size (8)
    # The UNet's input channels where they are not the latents' own: 9 for an inpainting UNet (the
    # latents, the mask and the masked image's latents, stacked); 0: latent_channels.
    unet_in_channels: int = 0
    # What a ControlNet adds to the UNet (down_block_additional_residuals, then the
    # mid_block_additional_residual), in the UNet's order: (channels, level) of each, level l at
    # 1/2**l of the latents' size (utils/networks.py packs them into one tensor, "residual_values").
    residual_layout: tuple[tuple[int, int], ...] = ()
    text_layers: int = 0  # the text encoder's transformer layers (12): clip_skip picks an earlier one's output
    prompt_chunks: int = 1  # the text_length-token chunks of a prompt's embeddings (the UNet's prompt_length)
    # SDXL (utils/families.py): a second text encoder (OpenCLIP bigG, 1280 features, text_encoder_2), whose
    # pooled, projected output (pooled_dim) conditions the UNet with time_ids (6: original size, crop,
    # target size; the refiner's 5: original size, crop, aesthetic score). 0: none (SD1.x).
    text_hidden_2: int = 0
    pooled_dim: int = 0
    time_ids: int = 0
    # The UNet's cross-attention features: the text encoders' features joined (SD1.5 768, SDXL 768 + 1280,
    # the refiner 1280); 0: text_hidden.
    cross_attention_dim: int = 0

    @property
    def prompt_length(self) -> int:
        """The UNet's text embeddings per sample: a chunk of text_length for each chunk of the prompt."""
        return self.text_length * self.prompt_chunks

    @property
    def unet_text_hidden(self) -> int:
        """The features of the UNet's text embeddings (encoder_hidden_states)."""
        return self.cross_attention_dim or self.text_hidden

    @property
    def unet_sample_channels(self) -> int:
        """The channels of the UNet's ``sample`` input."""
        return self.unet_in_channels or self.latent_channels

    @property
    def inpainting_unet(self) -> bool:
        """An inpainting checkpoint's UNet (9 channels): it takes a mask and a masked image with the latents."""
        return self.unet_sample_channels != self.latent_channels

    @property
    def image_height(self) -> int:
        return self.latent_height * self.vae_scale_factor

    @property
    def image_width(self) -> int:
        return self.latent_width * self.vae_scale_factor

    @property
    def latent_parameters(self) -> int:
        return 2 * self.latent_channels  # the VAE encoder's mean and log-variance

    @property
    def residual_values(self) -> int:
        """The values of a ControlNet's residuals per sample, at this size (a stride-2 convolution
        halves a size rounding up)."""
        return sum(channels * _halved(self.latent_height, level) * _halved(self.latent_width, level)
                   for channels, level in self.residual_layout)

    @property
    def size_step(self) -> int:
        """What an image's height and width must be multiples of: one latent pixel."""
        return self.vae_scale_factor

    def at_size(self, height: int, width: int, prompt_chunks: int = 1) -> ModelDims:
        """These dims for an image of ``height`` x ``width`` pixels (and a prompt of ``prompt_chunks``)."""
        return replace(self, latent_height=height // self.vae_scale_factor, latent_width=width // self.vae_scale_factor,
                       prompt_chunks=prompt_chunks)

    def resolve(self, dims: tuple[Dim, ...]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else getattr(self, d) for d in dims)

    def resolve_static(self, dims: tuple[Dim, ...]) -> tuple[int, ...]:
        """As a config declares them: the image's sizes vary (-1), the others are this checkpoint's."""
        return tuple(-1 if d in DYNAMIC else r for d, r in zip(dims, self.resolve(dims)))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelDims:
        """Read the sizes from a diffusers folder's config files (no weights are loaded)."""
        model_dir = Path(model_dir)

        def config(sub: str) -> dict:
            return json.loads((model_dir / sub / "config.json").read_text())

        # SDXL's refiner has the second text encoder only (and its tokenizer_2)
        first = "text_encoder" if (model_dir / "text_encoder").is_dir() else "text_encoder_2"
        text, unet, vae = config(first), config("unet"), config("vae")
        second = config("text_encoder_2") if (model_dir / "text_encoder_2").is_dir() else None
        tokenizer = "tokenizer" if first == "text_encoder" else "tokenizer_2"
        tokenizer_config = json.loads((model_dir / tokenizer / "tokenizer_config.json").read_text())
        latent = unet["sample_size"]
        latent_channels = vae.get("latent_channels", 4)
        return cls(
            text_length=min(tokenizer_config["model_max_length"], text["max_position_embeddings"]),
            text_hidden=text["hidden_size"] if first == "text_encoder" else 0,
            latent_channels=latent_channels,
            unet_in_channels=0 if unet["in_channels"] == latent_channels else unet["in_channels"],
            latent_height=latent,
            latent_width=latent,
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            residual_layout=residual_layout(unet),
            text_layers=text["num_hidden_layers"],
            **added_conditions(unet, second),
        )


def added_conditions(unet_config: dict, text_encoder_2_config: dict | None) -> dict:
    """SDXL's sizes (ModelDims' text_hidden_2, pooled_dim, time_ids, cross_attention_dim) from its
    UNet's and second text encoder's configs; none for SD1.x. The UNet's added embedding takes the
    pooled text and addition_time_embed_dim features per time id."""
    if unet_config.get("addition_embed_type") != "text_time" or text_encoder_2_config is None:
        return {}
    pooled = text_encoder_2_config["projection_dim"]
    time_ids = (unet_config["projection_class_embeddings_input_dim"] - pooled) // unet_config["addition_time_embed_dim"]
    return dict(text_hidden_2=text_encoder_2_config["hidden_size"], pooled_dim=pooled, time_ids=time_ids,
                cross_attention_dim=unet_config["cross_attention_dim"])


def _halved(size: int, times: int) -> int:
    return -(-size // 2 ** times)


def residual_layout(unet_config: dict) -> tuple[tuple[int, int], ...]:
    """(channels, level) of each residual a ControlNet gives a UNet of this config, in the order
    diffusers' UNet2DConditionModel collects its skip connections: the input convolution's output,
    each down block's resnets' and its downsampler's (all but the last block have one), then the
    mid block's."""
    channels = unet_config["block_out_channels"]
    layers = unet_config.get("layers_per_block", 2)
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    layout = [(channels[0], 0)]
    for level, (width, count) in enumerate(zip(channels, layers)):
        layout += [(width, level)] * count
        if level < len(channels) - 1:
            layout.append((width, level + 1))
    return (*layout, (channels[-1], len(channels) - 1))


@dataclass(frozen=True)
class ImageSizes:
    """The heights and widths (each, in pixels) a deployment serves: multiples of ``step`` in
    [min, max]. TensorRT's optimization profiles take the range on their spatial axes (the
    checkpoint's own size as ``opt``); the pipelines refuse a size outside it."""

    min: int
    max: int
    step: int

    @classmethod
    def default(cls, dims: ModelDims) -> ImageSizes:
        """Around the checkpoint's size: three quarters of it to one and a half (SD1.5: 384-768)."""
        step, native = dims.size_step, min(dims.image_height, dims.image_width)
        return cls(max(step, native * 3 // 4 // step * step), -(-native * 3 // 2 // step) * step, step)

    def __post_init__(self):
        if not (0 < self.min <= self.max and self.min % self.step == 0 and self.max % self.step == 0):
            raise ValueError(f"image sizes {self.min}-{self.max}: give multiples of {self.step}, the smaller first.")

    def allows(self, size: int) -> bool:
        return self.min <= size <= self.max and size % self.step == 0

    def describe(self) -> str:
        return f"a multiple of {self.step} in [{self.min}, {self.max}]"
