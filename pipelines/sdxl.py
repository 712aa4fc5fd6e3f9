"""What SDXL adds to the loop (pipelines/stable_diffusion.py), as diffusers' SDXL pipelines do it:

- the UNet's added conditions: the pooled text (a row per text, as the text embeddings) and the
  time ids (utils/added_conditions.py), repeated per image and doubled for guidance like the text
  embeddings, unconditional first;
- base then refiner (diffusers' ensemble of expert denoisers): the base stops where high_noise_frac
  of the noise is left (its denoising_end), and the refiner, a loop of its own, takes its latents
  from there (its denoising_start), without noising them again.
"""

from __future__ import annotations

import torch

from utils.added_conditions import time_ids
from utils.families import SDXL, SDXL_REFINER, Family


def added_inputs(options, family: Family, pooled: torch.Tensor | None, height: int, width: int, cfg: bool,
                 like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The UNet's inputs after its text embeddings, for every row of a step (``like``: the text
    embeddings, repeated per image: their dtype and device): none for SD1.x."""
    if not family.added_conditions:
        return ()
    if pooled is None:
        raise ValueError("an SDXL UNet needs the pooled text embeddings (text_embeds) with the text embeddings")
    pooled = pooled.to(device=like.device, dtype=like.dtype).repeat_interleave(options.num_images_per_prompt, dim=0)
    unconditional, conditional = time_ids(options, family, height, width)
    rows = pooled.shape[0] // 2 if cfg else pooled.shape[0]
    ids = [unconditional] * rows + [conditional] * rows if cfg else [conditional] * rows
    return pooled, torch.tensor(ids, dtype=like.dtype, device=like.device)


def base_timesteps(timesteps: torch.Tensor, options, family: Family, scheduler) -> torch.Tensor:
    """The base's steps: all of them, or those before the refiner's (denoising_end = high_noise_frac)."""
    if family is not SDXL or options.high_noise_frac is None:
        return timesteps
    cutoff = _discrete_cutoff(options.high_noise_frac, scheduler)
    return timesteps[:len([t for t in timesteps if t >= cutoff])]


def refiner_timesteps(scheduler, options) -> torch.Tensor:
    """The refiner's steps: those after the base's (denoising_start = high_noise_frac), as
    StableDiffusionXLImg2ImgPipeline's get_timesteps takes them."""
    cutoff = _discrete_cutoff(options.high_noise_frac, scheduler)
    steps = int((scheduler.timesteps < cutoff).sum().item())
    if scheduler.order == 2 and steps % 2 == 0:  # never between a second-order scheduler's two evaluations
        steps += 1
    start = len(scheduler.timesteps) - steps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def refines(family: Family) -> bool:
    """Whether this family's loop continues another's latents (the refiner)."""
    return family is SDXL_REFINER


def _discrete_cutoff(fraction: float, scheduler) -> int:
    trained = scheduler.config.num_train_timesteps
    return int(round(trained - fraction * trained))
