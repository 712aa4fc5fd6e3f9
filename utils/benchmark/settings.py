"""What a benchmark run measures, and what its contenders need."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from utils import specs
from utils.deployment import Deployment

TASKS = ("text-to-image", "image-to-image", "inpaint", "controlnet")
IMAGE_TASKS = ("image-to-image", "inpaint")  # from a picture (inpainting: and its mask)
CONTROLNET = "controlnet"  # text to image guided by the Canny edges of that picture, the deployment's ControlNet
STAGES = ("text_encoder", "unet", "vae_decoder")  # the networks of text to image, in the order they run
IMAGE_TO_IMAGE_STAGES = ("text_encoder", "vae_encoder", "unet", "vae_decoder")
# With a ControlNet: its calls, and the UNet's (which adds their residuals: controlled_unet, served).
CONTROLNET_STAGES = ("text_encoder", "controlnet", "unet", "vae_decoder")


def task_stages(task: str) -> tuple[str, ...]:
    """The networks a task's requests go through, in the order they run."""
    return IMAGE_TO_IMAGE_STAGES if task in IMAGE_TASKS else CONTROLNET_STAGES if task == CONTROLNET else STAGES


@dataclass(frozen=True)
class Settings:
    model: str = "tiny"
    prompt: str = "a photo of an astronaut riding a horse on mars"
    steps: int = 50
    guidance_scale: float | None = None  # None: the model family's (for_model fills it in)
    seed: int = 0
    warmup: int = 5
    runs: int = 20
    concurrency: tuple[int, ...] = ()  # client threads of each concurrency run (none by default)
    requests: int = 0  # requests in each concurrency run
    # Images in one call of the contender that bounds serving (diffusers-fast): the ideal batch
    # of the same kernels, the bound for that many concurrent clients.
    static_batches: tuple[int, ...] = ()
    task: str = "text-to-image"
    scheduler: str | None = None  # a diffusers scheduler class; None: the checkpoint's own
    # LoRA adapters (of the deployment's) that the requests ask for in turn: request i for
    # lora[i % len(lora)]; none: the base weights.
    lora: tuple[str, ...] = ()
    strength: float | None = None  # image to image and inpainting; None: the request's default (0.8; 1)
    image: np.ndarray | None = field(default=None, compare=False)  # image to image: the picture to start from
    mask: np.ndarray | None = field(default=None, compare=False)  # inpainting: what to repaint
    control: np.ndarray | None = field(default=None, compare=False)  # ControlNet: the control image (edges)
    # How the served pipelines are deployed; diffusers runs on the same device and precision.
    deployment: Deployment = field(default_factory=Deployment)

    def for_model(self, model_dir) -> "Settings":
        """These settings for the checkpoint in ``model_dir``: its family's guidance scale where none is given."""
        if self.guidance_scale is not None:
            return self
        from utils.families import family_of

        return replace(self, guidance_scale=family_of(specs.ModelDims.from_pretrained(model_dir)).default_guidance_scale)

    @property
    def device(self) -> str:
        """diffusers' device: the served networks' (the CPU for the ONNX routes, which the
        deployment requires to run on the CPU here)."""
        return self.deployment.device

    @property
    def precision(self) -> str:
        return self.deployment.served_precision

    @property
    def stages(self) -> tuple[str, ...]:
        return task_stages(self.task)

    @property
    def effective_strength(self) -> float:
        from utils.request import default_strength

        return self.strength if self.strength is not None else default_strength(self.task == "inpaint")

    def options(self, request: int = 0) -> dict:
        """The options of the ``request``-th request (they differ only in their adapter)."""
        options = dict(prompt=self.prompt, num_inference_steps=self.steps, seed=self.seed)
        if self.guidance_scale is not None:  # (none: each contender's default, the family's)
            options.update(guidance_scale=self.guidance_scale)
        if self.scheduler is not None:
            options.update(scheduler=self.scheduler)
        if self.lora:
            options.update(lora=[self.lora[request % len(self.lora)]])
        if self.task in IMAGE_TASKS:
            options.update(image=self.image, **({"strength": self.strength} if self.strength is not None else {}))
        if self.task == "inpaint":
            options.update(mask_image=self.mask)
        if self.task == CONTROLNET:  # the deployment's ControlNet, one control image for all prompts as diffusers repeats it
            options.update(controlnet=[self.deployment.controlnets[0].name], control_image=self.control)
        return options

    def batched_calls(self, batch: int) -> list[dict]:
        """The calls of an in-process pipeline that make ``batch`` requests' images at once: one
        call with the prompt (and the picture) that many times; with adapters, one call per adapter
        with its requests' share, since one call of diffusers runs one set of adapters."""
        turns = max(1, len(self.lora))  # request i asks for adapter i % turns (options)
        calls = []
        for request in range(min(batch, turns)):
            images = len(range(request, batch, turns))  # the requests that ask for this one's adapter
            options = self.options(request)
            options.update(prompt=[self.prompt] * images)
            if self.task in IMAGE_TASKS:
                options.update(image=np.repeat(self.image, images, axis=0))
            if self.task == "inpaint":
                options.update(mask_image=np.repeat(self.mask, images, axis=0))
            calls.append(options)
        return calls

    def describe(self) -> dict:
        """The settings as plain values, for the JSON."""
        return {"model": self.model, "prompt": self.prompt, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "seed": self.seed, "warmup": self.warmup, "runs": self.runs,
                "concurrency": list(self.concurrency), "requests": self.requests,
                "static_batches": list(self.static_batches), "task": self.task,
                **({"lora": list(self.lora)} if self.lora else {}),
                **({"strength": self.effective_strength} if self.task in IMAGE_TASKS else {}), "device": self.device,
                "precision": self.precision, "deployment": self.deployment.describe()}


@dataclass
class Context:
    """What a contender needs: the settings, the model folder and, for the Triton ones, the
    server address."""

    settings: Settings
    model_dir: Path
    url: str | None
    adapter_files: dict[str, Path] = field(default_factory=dict)  # the deployment's LoRA files, for diffusers
    controlnet_folders: dict[str, Path] = field(default_factory=dict)  # and its ControlNets' folders
