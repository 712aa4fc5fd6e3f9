"""Previews of a loop's latents, as the streaming pipelines send them between steps: each latent
pixel one RGB pixel by a linear map, instead of the VAE decoder (at 1/64 of the pixels, for
nothing like its cost)."""

from __future__ import annotations

import torch

from utils.request import DEFAULT_PREVIEW_EVERY, InvalidRequest

# A linear fit from a family's (scaled) latent channels to RGB in [-1, 1], rows per channel, then a
# bias per colour: the approximation community previewers use (ComfyUI's latent_rgb_factors and
# latent_rgb_factors_bias, comfy/latent_formats.py). SDXL's VAE has latents of its own.
LATENT_RGB = {
    "sd": (((0.3512, 0.2297, 0.3227),
            (0.3250, 0.4974, 0.2350),
            (-0.2829, 0.1762, 0.2721),
            (-0.2120, -0.2616, -0.7177)), (0.0, 0.0, 0.0)),
    "sdxl": (((0.3651, 0.4232, 0.4341),
              (-0.2533, -0.0042, 0.1068),
              (0.1076, 0.1111, -0.0362),
              (-0.3165, -0.2492, -0.2188)), (0.1084, -0.0175, -0.0011)),
}


def preview(latents: torch.Tensor, family: str = "sd") -> torch.Tensor:
    """uint8 [N, h, w, 3] on the CPU, for a ``family`` (utils/families.py: "sd", "sdxl"; SDXL's
    refiner has SDXL's VAE). Four latent channels only; others get grey previews."""
    factors, bias = LATENT_RGB["sd" if family == "sd" else "sdxl"]
    if latents.shape[1] != len(factors):
        return torch.full((latents.shape[0], *latents.shape[2:], 3), 128, dtype=torch.uint8)
    rgb = torch.einsum("nchw,cr->nhwr", latents.float().cpu(), torch.tensor(factors)) + torch.tensor(bias)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)


def preview_every(value) -> int:
    """A streaming request's preview_every (a tensor of one value; None: the default)."""
    if value is None:
        return DEFAULT_PREVIEW_EVERY
    if value.numel() != 1:
        raise InvalidRequest(f"preview_every has {value.numel()} values: send exactly one, shape [1].")
    every = int(value.reshape(-1)[0])
    if every < 0:
        raise InvalidRequest(f"preview_every={every} is not allowed: use a number of steps (1: every step), "
                             f"or 0 for no previews.")
    return every
