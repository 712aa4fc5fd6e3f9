"""The model families served: SD1.x and SDXL (base, and its refiner), each a set of networks.

A checkpoint's family follows from its config files (utils/model_dims.py reads SDXL's sizes where
its UNet has SDXL's added conditions), so nothing else asks the user which one it is. What SDXL adds
to SD1.x's contracts (utils/specs.py) is here, in the same terms:

- a second text encoder (OpenCLIP bigG with projection, ``text_encoder_2``), whose pooled, projected
  output conditions the UNet besides its hidden states; both text encoders give the hidden state
  before the last (diffusers' SDXL conditions on it, clip_skip counting back from there), and the
  UNet's text embeddings are the two joined along the features;
- the UNet's added conditions: ``text_embeds`` (the pooled text) and ``time_ids`` (original size,
  crop's top-left corner and target size, in pixels; the refiner's: original size, crop, and an
  aesthetic score), both doubled for guidance as its other inputs are;
- the refiner (diffusers' ensemble of expert denoisers): a UNet of its own, served as
  ``refiner_unet``, conditioned by the second text encoder alone, which it shares with the base,
  as diffusers' documentation loads them.

The VAE and the scheduler are the same networks and code as SD1.x's; the VAE has its own scaling
factor (0.13025), which the loop reads from the checkpoint as it does SD1.5's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from utils import specs
from utils.request import DEFAULT_GUIDANCE_SCALE, DEFAULT_STRENGTH
from utils.spec_types import ACTIVATION, NetworkSpec, TensorSpec

# The second text encoder: the same rows as the first (each tokenized by its own tokenizer), the
# hidden state the UNet conditions on, and its pooled output projected (what SDXL calls text_embeds).
TEXT_EMBEDS = TensorSpec("text_embeds", ACTIVATION, ("pooled_dim",))
TEXT_ENCODER_2 = replace(
    specs.TEXT_ENCODER, name="text_encoder_2",
    outputs=(replace(specs.TEXT_ENCODER.outputs[0], dims=("text_length", "text_hidden_2")), TEXT_EMBEDS))
# SDXL's UNet: SD1.x's inputs, then the added conditions, one row per sample.
TIME_IDS = TensorSpec("time_ids", ACTIVATION, ("time_ids",))
UNET_XL = replace(specs.UNET, inputs=(*specs.UNET.inputs, TEXT_EMBEDS, TIME_IDS))
REFINER_UNET = replace(UNET_XL, name="refiner_unet")  # its dims are the refiner checkpoint's


@dataclass(frozen=True)
class Family:
    """The networks a checkpoint of this family is served as, and what its loop differs in."""

    name: str
    title: str  # as the project's messages name it
    text_encoders: tuple[NetworkSpec, ...]
    unet: NetworkSpec
    # Image to image's default strength and the guidance scale where a request gives none: diffusers'
    # pipelines' for the family.
    default_strength: float
    default_guidance_scale: float
    # Where the text encoders' hidden state is taken, counted back from the last layer's output
    # (clip_skip adds to it): SD1.x's last layer through the final layer norm (0); SDXL's the one
    # before, as it is (1, no layer norm).
    hidden_state_offset: int = 0

    @property
    def networks(self) -> dict[str, NetworkSpec]:
        """Every network served, in the order a request meets them."""
        return {network.name: network for network in (*self.text_encoders, self.unet, specs.VAE_ENCODER,
                                                       specs.VAE_DECODER)}

    @property
    def added_conditions(self) -> bool:
        """Whether the UNet takes SDXL's pooled text and time ids."""
        return TIME_IDS in self.unet.inputs

    @property
    def pooled(self) -> NetworkSpec | None:
        """The text encoder whose pooled output the UNet takes (SDXL's second), if any."""
        return next((network for network in self.text_encoders if TEXT_EMBEDS in network.outputs), None)


SD = Family("sd", "SD1.x", (specs.TEXT_ENCODER,), specs.UNET, default_strength=DEFAULT_STRENGTH,
            default_guidance_scale=DEFAULT_GUIDANCE_SCALE)
SDXL = Family("sdxl", "SDXL", (specs.TEXT_ENCODER, TEXT_ENCODER_2), UNET_XL, default_strength=0.3,
              default_guidance_scale=5.0, hidden_state_offset=1)
# The refiner as a checkpoint of its own (its own UNet, the second text encoder alone); served beside
# an SDXL base, its UNet as refiner_unet and its text encoder the base's.
SDXL_REFINER = Family("sdxl-refiner", "SDXL's refiner", (TEXT_ENCODER_2,), REFINER_UNET, default_strength=0.3,
                      default_guidance_scale=5.0, hidden_state_offset=1)
FAMILIES = {family.name: family for family in (SD, SDXL, SDXL_REFINER)}


def family_of(dims: specs.ModelDims) -> Family:
    """The family of a checkpoint of these sizes: SDXL's UNet takes added conditions; its refiner has
    no first text encoder."""
    if not dims.time_ids:
        return SD
    return SDXL if dims.text_hidden else SDXL_REFINER


def is_unet(network: NetworkSpec) -> bool:
    """Whether ``network`` is a family's UNet (a denoising step), whichever family's."""
    return network.name in (specs.UNET.name, REFINER_UNET.name)
