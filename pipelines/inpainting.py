"""Inpainting: what the loop adds to image to image when the request has a ``mask_image``.

diffusers' ``StableDiffusionInpaintPipeline`` takes two kinds of checkpoint, and so does this loop:

- an inpainting UNet (9 input channels, as SD1.5's inpainting checkpoint): at each step the UNet
  sees the latents with the mask and the masked image's latents stacked on, and repaints the
  white part itself;
- a plain UNet (4 channels): the loop denoises the whole image and, after each step, puts the
  image's own latents back outside the mask, noised to the next step's level ("blending").

The mask goes to the latents' size by nearest neighbour, white (MASK_THRESHOLD and up) as 1. The
generator is drawn in diffusers' order (the image's latent sample, the noise, then the masked
image's latent sample), so that the same seed gives the same image.
"""

from __future__ import annotations

from typing import Callable

import torch

from utils import specs
from utils.mask import MASK_THRESHOLD
from utils.model_dims import ModelDims
from utils.request import GenerationRequest, InvalidRequest


def mask_pixels(mask_image, device: torch.device) -> torch.Tensor:
    """uint8 [N, H, W] -> [N, 1, H, W] of 0 and 1 (1: repaint), as diffusers' mask processor binarizes."""
    mask = torch.as_tensor(mask_image, device=device)[:, None]
    return (mask >= MASK_THRESHOLD).to(torch.float32)


def masked_image(normalized: torch.Tensor, mask_image) -> torch.Tensor:
    """The image in [-1, 1] with the part to repaint made 0 (grey): what an inpainting UNet is
    shown of the image (diffusers' ``init_image * (mask < 0.5)``)."""
    keep = 1.0 - mask_pixels(mask_image, normalized.device)
    return (normalized.float() * keep).to(normalized.dtype)


class Inpainting:
    """One request's mask and image latents through its loop: ``unet_input`` extends each UNet
    input (an inpainting UNet), ``blend`` follows each scheduler step (a plain UNet)."""

    def __init__(self, mask_image, noise: torch.Tensor, image_latents: torch.Tensor | None,
                 masked_latents: torch.Tensor | None, vae_scale_factor: int):
        """``noise``: the loop's initial noise [batch, C, h, w]; ``image_latents``: the image's
        latents, scaled, one row per image made (a plain UNet's blend needs them);
        ``masked_latents``: the masked image's, likewise, for an inpainting UNet's input (None: a
        plain UNet, which blends instead)."""
        batch, _, height, width = noise.shape
        mask = mask_pixels(mask_image, noise.device)
        if batch % mask.shape[0]:
            raise InvalidRequest(f"mask_image has {mask.shape[0]} masks for {batch} images: send one mask, or one per "
                                 f"image.")
        if tuple(mask.shape[2:]) != (height * vae_scale_factor, width * vae_scale_factor):
            raise InvalidRequest(f"mask_image is {mask.shape[2]}x{mask.shape[3]} pixels (height x width) for an image of "
                                 f"{height * vae_scale_factor}x{width * vae_scale_factor}: send the mask at the "
                                 f"image's own size.")
        mask = torch.nn.functional.interpolate(mask, size=(height, width))  # nearest, as diffusers
        self.mask = mask.to(noise.dtype).repeat(batch // mask.shape[0], 1, 1, 1)
        self.inpainting_unet = masked_latents is not None
        self.image_latents, self.noise = image_latents, noise
        self.masked_latents = masked_latents
        self._unet_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per guidance rows: built once

    @classmethod
    def start(cls, batch: int, sample: Callable[..., torch.Tensor], randn: Callable[..., torch.Tensor],
              latent_parameters: torch.Tensor | None, masked_latent_parameters: torch.Tensor | None,
              options: GenerationRequest, dims: ModelDims, scheduler,
              timesteps: torch.Tensor) -> tuple[torch.Tensor, Inpainting]:
        """A request's initial latents (``batch`` images) and its Inpainting. ``sample(parameters,
        name=...)``: the loop's sample of a VAE latent distribution, scaled, one row per image made;
        ``randn(shape)``: a draw from the request's generator. The generator
        is drawn in StableDiffusionInpaintPipeline's order: the image's sample (which an inpainting
        UNet does not need at strength 1), the noise, the masked image's sample (which a plain UNet
        does not use, and diffusers draws all the same: drawn here too, with no VAE call where the
        masked image was not encoded, it keeps the generator in step for the schedulers that draw
        from it at each step)."""
        from_noise = options.strength == 1.0
        needs_image = not (dims.inpainting_unet and from_noise)  # an inpainting UNet at strength 1 starts from noise
        encoded = latent_parameters if needs_image else masked_latent_parameters
        for name, parameters, needed in ((specs.LATENT_PARAMETERS.name, latent_parameters, needs_image),
                                         (specs.MASKED_LATENT_PARAMETERS.name, masked_latent_parameters,
                                          dims.inpainting_unet)):
            if needed and parameters is None:
                raise InvalidRequest(f"{name} is required here: send the VAE encoder's output for the image.")
            if parameters is not None and parameters.shape[2:] != encoded.shape[2:]:
                raise InvalidRequest(f"{name} has latents of {list(parameters.shape[2:])} for an image of "
                                     f"{list(encoded.shape[2:])}: encode the image and the masked image at one size.")
        image_latents = sample(latent_parameters) if needs_image else None
        shape = (batch, dims.latent_channels, *encoded.shape[2:])
        noise = randn(shape)
        if from_noise:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        masked = None
        if masked_latent_parameters is not None:
            masked = sample(masked_latent_parameters, name=specs.MASKED_LATENT_PARAMETERS.name)
        else:  # as many as diffusers' masked images: one per image (the checks allow no more masks)
            randn((encoded.shape[0], *shape[1:]))
        return latents, cls(options.mask_image, noise, image_latents, masked if dims.inpainting_unet else None,
                            dims.vae_scale_factor)

    def unet_input(self, model_input: torch.Tensor) -> torch.Tensor:
        """An inpainting UNet's input: the (scaled) latents, the mask and the masked image's latents,
        each repeated for the guidance rows the input has."""
        if not self.inpainting_unet:
            return model_input
        rows = model_input.shape[0] // self.mask.shape[0]
        if rows not in self._unet_inputs:
            self._unet_inputs[rows] = (self.mask.repeat(rows, 1, 1, 1), self.masked_latents.repeat(rows, 1, 1, 1))
        return torch.cat([model_input, *self._unet_inputs[rows]], dim=1)

    def blend(self, latents: torch.Tensor, done: int, timesteps: torch.Tensor, scheduler) -> torch.Tensor:
        """A plain UNet's step, finished: the image's own latents outside the mask, noised to the
        next timestep (none after the last step)."""
        if self.inpainting_unet:
            return latents
        kept = self.image_latents
        if done + 1 < len(timesteps):
            kept = scheduler.add_noise(kept, self.noise, timesteps[done + 1:done + 2])
        return (1 - self.mask) * kept + self.mask * latents

