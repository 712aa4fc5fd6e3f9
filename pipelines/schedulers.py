"""A request's scheduler and the steps it takes, as diffusers' pipelines set them up: each request
gets a scheduler of its own, and image to image (SDXL's refiner too: pipelines/sdxl.py) takes the
last steps of its schedule."""

from __future__ import annotations

import inspect

import torch

from utils.request import GenerationRequest


def request_scheduler(components, options: GenerationRequest):
    """A new scheduler (PNDM keeps state between steps) with the request's timesteps. They stay
    on the CPU, where it looks up its tables with them: a GPU timestep would make each step
    wait for the GPU to tell the CPU its value, which stops a GPU loop from queuing its next
    step while the UNet runs this one (utils/python_backend/step_batching.py)."""
    scheduler = components.new_scheduler(options.scheduler)
    scheduler.set_timesteps(options.num_inference_steps, device="cpu")
    return scheduler


def step_kwargs(scheduler, generator: torch.Generator) -> dict:
    """As StableDiffusionPipeline's prepare_extra_step_kwargs: the generator, and its eta (0),
    where the scheduler's step takes them (DDIM's and TCD's eta: 0 samples deterministically)."""
    accepted = inspect.signature(scheduler.step).parameters
    return {key: value for key, value in (("generator", generator), ("eta", 0.0)) if key in accepted}


def img2img_timesteps(scheduler, options: GenerationRequest) -> torch.Tensor:
    """The last int(steps * strength) steps of the schedule, as StableDiffusionImg2ImgPipeline
    takes them (its get_timesteps)."""
    steps = options.num_inference_steps
    start = steps - min(int(steps * options.strength), steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order:]
