"""The Stable Diffusion text-to-image loop, written once.

The client-side pipeline (pipelines/ensemble.py) and the BLS model
(triton/models/pipeline_text_to_image) run this same code; they differ only in how a network is
called: ``run_network(spec, *inputs) -> outputs``, over gRPC or as a BLS sub-request. Same seed
and settings give the image of ``diffusers.StableDiffusionPipeline`` (tests/test_end_to_end.py).
"""

from __future__ import annotations

import copy
import inspect
import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from pipelines.request import GenerationRequest, check_request, max_inference_steps
from utils import specs


_LAZY_IMPORTS = threading.Lock()


class RunNetwork(Protocol):
    def __call__(self, network: specs.NetworkSpec, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


class Cancelled(RuntimeError):
    pass


@dataclass
class PipelineComponents:
    """What the loop needs from a checkpoint besides the networks: no weights."""

    tokenizer: object
    scheduler: object  # a fresh scheduler, copied for each request (new_scheduler)
    scheduler_config: dict
    dims: specs.ModelDims
    vae_scaling_factor: float

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> PipelineComponents:
        with _LAZY_IMPORTS:  # transformers' lazy module fails two threads importing from it at once
            import diffusers
            from transformers import CLIPTokenizer

        model_dir = Path(model_dir)
        scheduler_config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
        vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
        scheduler_class = getattr(diffusers, scheduler_config["_class_name"])
        # The constructor, not from_config: from_config imports every compatible scheduler class
        # on each call, and some import scipy, which fails in the pipeline model's numpy 1
        # environment (utils/environments.py). Config keys the class does not take (another
        # scheduler's, like clip_sample for PNDM) are left out, as from_config leaves them.
        accepted = inspect.signature(scheduler_class.__init__).parameters
        scheduler = scheduler_class(**{k: v for k, v in scheduler_config.items() if k in accepted})
        return cls(
            tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
            scheduler=scheduler,
            scheduler_config=scheduler_config,
            dims=specs.ModelDims.from_pretrained(model_dir),
            vae_scaling_factor=vae_config.get("scaling_factor", 0.18215),
        )

    def new_scheduler(self):
        """A scheduler of a request's own: PNDM keeps state between steps."""
        return copy.deepcopy(self.scheduler)


class StableDiffusion:
    """Text to image with classifier-free guidance, one network call at a time."""

    def __init__(self, components: PipelineComponents, run_network: RunNetwork,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.components = components
        self.run_network = run_network
        self.dtype = dtype  # the precision the networks are served at, as diffusers' dtype argument
        self.device = torch.device(device)
        self.max_prompts = specs.TEXT_TO_IMAGE.max_prompts()
        self.max_steps = max_inference_steps(components.scheduler_config)

    def run(self, network: specs.NetworkSpec, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Call a network and get its outputs on the loop's device, wherever it answered:
        TensorRT, and ONNX Runtime on a GPU, answer in the GPU memory they computed in."""
        return tuple(output.to(self.device) for output in self.run_network(network, *inputs))

    def check(self, request: GenerationRequest) -> GenerationRequest:
        return check_request(request, max_prompts=self.max_prompts, max_steps=self.max_steps)

    def warm_up(self, steps: int = 3) -> None:
        """Run the loop's own work once (tokenizer, scheduler, guidance, post-processing) with
        networks that return zeros, so that this process's first request does not pay for lazy
        initialization (CUDA context, kernel loading, allocator pools), and calls no model."""
        dims = self.components.dims

        def zeros(network: specs.NetworkSpec, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            batch = inputs[0].shape[0]
            return tuple(torch.zeros(network.shape(t, batch, dims), dtype=self.dtype, device=self.device)
                         for t in network.outputs)

        StableDiffusion(self.components, zeros, self.dtype, self.device)(
            GenerationRequest(prompt="warm-up", num_inference_steps=steps, seed=0))

    def __call__(self, request: GenerationRequest, progress: bool = False,
                 is_cancelled: Callable[[], bool] = lambda: False) -> torch.Tensor:
        """Generate; return uint8 images [N, H, W, 3] on the CPU."""
        request = self.check(request)
        dims = self.components.dims
        cfg = request.do_classifier_free_guidance
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)

        # 1. Tokenize: unconditional rows first, then the prompts (the specs' CFG order).
        texts = (request.negative_prompts() if cfg else []) + list(request.prompt)
        tokens = self.components.tokenizer(
            texts, padding="max_length", max_length=dims.text_length, truncation=True, return_tensors="pt"
        )

        # 2. One text encoder call for both halves.
        input_ids = tokens.input_ids.to(device=self.device, dtype=torch.int32)
        (text_embeddings,) = self.run(specs.TEXT_ENCODER, input_ids)

        # 3. A scheduler of this request's own: PNDM keeps state between steps.
        scheduler = self.components.new_scheduler()
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}

        # 4. Initial noise, from the CPU generator as diffusers draws it, in the served precision.
        shape = (request.batch_size, dims.latent_channels, dims.latent_height, dims.latent_width)
        latents = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        latents = latents * scheduler.init_noise_sigma

        # 5. Denoise.
        for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
            if is_cancelled():
                raise Cancelled(f"cancelled before step {int(t)}")
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            timestep = t.to(torch.float32).expand(model_input.shape[0])  # one per sample (FP32)
            (noise,) = self.run(specs.UNET, model_input, timestep, text_embeddings)
            if cfg:
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + request.guidance_scale * (noise_text - noise_uncond)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]

        # 6. Decode.
        (image,) = self.run(specs.VAE_DECODER, latents / self.components.vae_scaling_factor)

        # 7. To uint8 RGB, as diffusers' VaeImageProcessor.postprocess does.
        image = (image / 2 + 0.5).clamp(0, 1)
        return (image.permute(0, 2, 3, 1).float().cpu() * 255).round().to(torch.uint8).contiguous()
