"""The Stable Diffusion loop, text to image, image to image and inpainting, written once.

The client-side pipeline (pipelines/client_side.py), the BLS models (triton/models/pipeline_*)
and the ensembles' Python steps (tokenizer, prompt_embeds, denoise, postprocess, preprocess_image) run this same
code; they differ only in how a network is called: ``call_network(spec, *inputs) -> outputs``, over
gRPC or as a BLS sub-request, or in which steps they run. Same seed and settings give the image of
``diffusers.StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline``
(tests/test_end_to_end.py, tests/test_inpainting.py); what inpainting adds is pipelines/inpainting.py,
and long and weighted prompts pipelines/prompts.py.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import secrets
import threading
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines import prompts
from pipelines.components import PipelineComponents
from pipelines.controlnet import Control
from pipelines.inpainting import Inpainting, masked_image
from utils import metrics, specs
from utils.controlnet import check_control
from utils.lora import ServedAdapters
from utils.request import (GenerationRequest, InvalidRequest, check_image, check_options, check_request,
                           max_inference_steps)


class CallNetwork(Protocol):
    """Call ``network``; the UNet and the text encoder with these LoRA ``adapters``, (name,
    weight) pairs, where the served adapters route them (utils/lora.py's ServedAdapters.route)."""

    def __call__(self, network: specs.NetworkSpec, *inputs: torch.Tensor,
                 adapters: tuple[tuple[str, float], ...] = ()) -> tuple[torch.Tensor, ...]: ...


class Cancelled(RuntimeError):
    pass


@dataclass(frozen=True)
class Generated:
    images: torch.Tensor  # uint8 [N, H, W, 3] on the CPU
    truncated: list[str]  # the text cut from each prompt (pipelines/prompts.py's order), "" where none


class InvalidImage(RuntimeError):
    """A generated image is not finite or is one flat colour: never sent as a success."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason  # the label it is counted under (utils/metrics.py)


class StableDiffusion:
    """Text to image and image to image with classifier-free guidance, one network call at a time.

    Each step is a method of its own, in the order a request goes through them, so that the
    ensembles' Python models (tokenizer, denoise, postprocess, preprocess_image) run exactly this
    code; ``__call__`` runs them all, as the client-side pipeline and the BLS models do.
    """

    def __init__(self, components: PipelineComponents, call_network: CallNetwork,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 sizes: specs.ImageSizes | None = None,
                 loop_scope: Callable[[], ContextManager] = contextlib.nullcontext,
                 adapters: ServedAdapters = ServedAdapters(), controlnets: tuple[str, ...] = ()):
        """``sizes``: the image sizes the networks are served at (default: ImageSizes.default);
        ``adapters``: the LoRA adapters served (utils/lora.py); ``controlnets``: the ControlNets, by name.
        ``loop_scope``: entered around each denoising loop (a UNet in the loop's own process counts
        the loops whose steps it batches, utils/python_backend/step_batching.py)."""
        self.loop_scope = loop_scope
        self.adapters = adapters
        self.controlnets = controlnets
        self.components = components
        self.sizes = sizes or specs.ImageSizes.default(components.dims)
        self._call_network = call_network  # over gRPC, by BLS, or in this process
        self.dtype = dtype  # the precision the networks are served at, as diffusers' dtype argument
        self.device = torch.device(device)
        self.max_prompts = specs.MAX_PROMPTS
        self.max_steps = max_inference_steps(components.scheduler_config)
        self._tokenizing = threading.Lock()

    def call_network(self, network: specs.NetworkSpec, *inputs: torch.Tensor,
                     adapters: tuple[tuple[str, float], ...] = ()) -> tuple[torch.Tensor, ...]:
        """Call a network and get its outputs on the loop's device, wherever it answered:
        TensorRT, and ONNX Runtime on a GPU, answer in the GPU memory they computed in."""
        return tuple(output.to(self.device) for output in self._call_network(network, *inputs, adapters=adapters))

    def check(self, request: GenerationRequest) -> GenerationRequest:
        request = check_request(request, max_prompts=self.max_prompts, max_steps=self.max_steps, sizes=self.sizes)
        prompts.check_clip_skip(request, self.components.dims)
        self.adapters.check(request.lora, request.lora_scale)
        return check_control(request, self.controlnets, self.sizes)

    def check_options(self, request: GenerationRequest, image_to_image: bool) -> GenerationRequest:
        request = check_options(request, self.max_steps, image_to_image, self.sizes)
        self.adapters.check(request.lora, request.lora_scale)
        self.check_unet_kind(request)
        return check_control(request, self.controlnets, self.sizes)

    def check_unet_kind(self, request: GenerationRequest) -> None:
        """An inpainting checkpoint's UNet repaints a masked image and nothing else (diffusers' text
        to image and image to image pipelines refuse it too): where a request's task is known."""
        if self.components.dims.inpainting_unet and request.mask_image is None:
            raise InvalidRequest("mask_image is required: this deployment serves an inpainting checkpoint (its UNet "
                                 f"takes {self.components.dims.unet_sample_channels} channels: the latents, the mask "
                                 f"and the masked image), which only repaints; send an image and a mask_image.")

    def check_image(self, images, name: str = specs.INIT_IMAGE.name) -> np.ndarray:
        return check_image(images, None, self.sizes, name=name)

    def warm_up(self, steps: int = 3, tokenize: bool = True) -> None:
        """Run the loop's own work once (tokenizer, scheduler, guidance) with networks that return
        zeros, so that this process's first request does not pay for lazy initialization (CUDA
        context, kernel loading, allocator pools), and calls no model. ``tokenize=False``: for a
        model that is given text embeddings."""
        dims = self.components.dims

        def zeros(network: specs.NetworkSpec, *inputs: torch.Tensor, adapters=()) -> tuple[torch.Tensor, ...]:
            batch = inputs[0].shape[0]
            return tuple(torch.zeros(network.shape(t, batch, dims), dtype=self.dtype, device=self.device)
                         for t in network.outputs)

        idle = StableDiffusion(self.components, zeros, self.dtype, self.device, self.sizes)
        request = GenerationRequest(prompt="warm-up", num_inference_steps=steps, seed=0)
        text_embeddings = (idle.encode_prompt(request) if tokenize
                           else zeros(specs.TEXT_ENCODER, torch.zeros(2))[0])
        idle.decode(idle.denoise(text_embeddings, request))

    def __call__(self, request: GenerationRequest, progress: bool = False,
                 is_cancelled: Callable[[], bool] = lambda: False,
                 on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Generate; return uint8 images [N, H, W, 3] on the CPU. ``on_step``: see denoise."""
        return self.generate(request, progress, is_cancelled, on_step).images

    def generate(self, request: GenerationRequest, progress: bool = False,
                 is_cancelled: Callable[[], bool] = lambda: False,
                 on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> Generated:
        """The images, and the text cut from each prompt (past the longest prompt served)."""
        request = self.check(request)
        self.check_unet_kind(request)
        rows = self.tokenize(request)
        text_embeddings = self.encode_prompt(request, rows)
        inpainting_unet = request.mask_image is not None and self.components.dims.inpainting_unet
        latent_parameters = masked = None  # an inpainting UNet is shown the masked image; a plain one blends
        if request.image is not None and not (inpainting_unet and request.strength == 1.0):  # (from noise)
            latent_parameters = self.encode_image(request.image)
        if inpainting_unet:
            masked = self.encode_image(request.image, request.mask_image)
        latents = self.denoise(text_embeddings, request, latent_parameters, progress, is_cancelled, on_step,
                               masked_latent_parameters=masked)
        return Generated(self.postprocess(self.decode(latents)), rows.truncated)

    # 1. Tokenize: the rows the text encoder encodes, unconditional prompts first (the specs' CFG
    # order): a row per chunk of a long prompt, more for a weighted one (pipelines/prompts.py).
    def tokenize(self, request: GenerationRequest) -> prompts.EncoderRows:
        with self._tokenizing:  # a fast tokenizer sets its padding per call: one thread at a time
            rows = prompts.plan(self.components.tokenizer, request, self.components.dims)
        return prompts.EncoderRows(*(t.to(self.device) for t in (rows.input_ids, rows.attention_mask,
                                                                    rows.skipped_layers)), rows.truncated)

    # 2. One text encoder call on those rows (plan refuses more than its batch profile takes), with
    # the request's LoRA adapters where the text encoder applies them; then the UNet's text embeddings.
    def encode_prompt(self, request: GenerationRequest, rows: prompts.EncoderRows | None = None) -> torch.Tensor:
        rows = rows or self.tokenize(request)
        (encoded,) = self.call_network(specs.TEXT_ENCODER, rows.input_ids, rows.attention_mask, rows.skipped_layers,
                                       adapters=request.adapters)
        return self.prompt_embeds(request, encoded)

    def prompt_embeds(self, request: GenerationRequest, encoded: torch.Tensor) -> torch.Tensor:
        """The UNet's text embeddings from the text encoder's rows (compel's arithmetic, on the CPU)."""
        with self._tokenizing:
            embeddings = prompts.assemble(self.components.tokenizer, request, self.components.dims, encoded.cpu())
        return embeddings.to(device=self.device, dtype=encoded.dtype)

    # Image to image: the image in [-1, 1], then the VAE encoder's mean and log-variance.
    def preprocess_image(self, images, mask_image=None) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> [N, 3, H, W] in [-1, 1] at the served precision, as diffusers'
        VaeImageProcessor does for PIL images; with an inpainting ``mask_image``, the masked image."""
        pixels = torch.as_tensor(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        normalized = 2.0 * pixels - 1.0
        if mask_image is not None:
            normalized = masked_image(normalized, mask_image)
        return normalized.to(device=self.device, dtype=self.dtype)

    def encode_image(self, images, mask_image=None) -> torch.Tensor:
        (latent_parameters,) = self.call_network(specs.VAE_ENCODER, self.preprocess_image(images, mask_image))
        return latent_parameters

    # 3-5. The loop: timesteps, initial latents, denoising.
    def denoise(self, text_embeddings: torch.Tensor, options: GenerationRequest,
                latent_parameters: torch.Tensor | None = None, progress: bool = False,
                is_cancelled: Callable[[], bool] = lambda: False,
                on_step: Callable[[int, int, torch.Tensor], None] | None = None,
                masked_latent_parameters: torch.Tensor | None = None) -> torch.Tensor:
        """Latents for the VAE decoder (unscaled) from the text embeddings (and, for image to
        image, the VAE encoder's parameters); ``options``: guidance, steps, seed, strength,
        scheduler, images per prompt, for text to image the size (default: the checkpoint's), and
        for inpainting the mask (with an inpainting UNet, ``masked_latent_parameters`` too).
        ``on_step(done, total, latents)`` after each step (a streaming model's previews)."""
        text_embeddings = text_embeddings.to(device=self.device, dtype=self.dtype)
        cfg = options.do_classifier_free_guidance
        rows = text_embeddings.shape[0]
        if cfg and rows % 2:
            raise InvalidRequest(f"text_embeddings has {rows} rows: with guidance_scale > 1 send the unconditional "
                                 f"and the conditional rows of each prompt (an even number).")
        # num_images_per_prompt: each prompt's rows repeated, as diffusers' encode_prompt does.
        text_embeddings = text_embeddings.repeat_interleave(options.num_images_per_prompt, dim=0)
        batch = text_embeddings.shape[0] // 2 if cfg else text_embeddings.shape[0]
        seed = options.seed if options.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)

        # 3. A scheduler of this request's own; 4. the initial latents.
        scheduler = self._request_scheduler(options)
        step_kwargs = self._step_kwargs(scheduler, generator)
        timesteps, latents, inpainting = self._start(options, batch, scheduler, generator, latent_parameters,
                                                     masked_latent_parameters)
        control = None if options.control_image is None else Control(options, batch, len(timesteps), self.dtype,
                                                                     self.device)

        # 5. Denoise (loop_scope: see __init__). The UNet's timesteps (FP32, one per sample) go to
        # the loop's device once, not at every step. Guidance, where the request cuts it off, ends
        # after the step at that fraction of the loop's steps, as diffusers' SDCFGCutoffCallback
        # ends it: from then on the UNet runs the conditional rows alone.
        unet_timesteps = timesteps.to(device=self.device, dtype=torch.float32)
        adapters = options.adapters  # LoRA: (name, weight) pairs, routed by the served adapters (utils/lora.py)
        cutoff = None if options.cfg_cutoff_step_ratio is None else int(len(timesteps) * options.cfg_cutoff_step_ratio)
        # A ControlNet request's controlled steps go to controlled_unet, which a UNet in this
        # process does not batch: its loop stays out of the count, so the others never wait for it.
        with (self.loop_scope if control is None else contextlib.nullcontext)():
            for done, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress, leave=False)):
                if is_cancelled():
                    raise Cancelled(f"cancelled at step {done} of {len(timesteps)}")
                model_input = torch.cat([latents] * 2) if cfg else latents
                model_input = scheduler.scale_model_input(model_input, t)
                if inpainting is not None:
                    model_input = inpainting.unet_input(model_input)
                timestep = unet_timesteps[done].expand(model_input.shape[0])
                noise = self._predict_noise(model_input, timestep, text_embeddings, adapters, control, done)
                if cfg:
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + options.guidance_scale * (noise_text - noise_uncond)
                latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                if inpainting is not None:
                    latents = inpainting.blend(latents, done, timesteps, scheduler)
                if cfg and done == cutoff:
                    cfg, text_embeddings = False, text_embeddings.chunk(2)[1]
                if on_step is not None:
                    on_step(done + 1, len(timesteps), latents)
        return latents / self.components.vae_scaling_factor

    def _predict_noise(self, model_input: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                       adapters: tuple[tuple[str, float], ...], control: Control | None, done: int) -> torch.Tensor:
        """The UNet's call at step ``done``; where ControlNets act at this step, with their
        residuals, after calling them (pipelines/controlnet.py)."""
        residuals = control and control.residuals(self.call_network, done, model_input, timestep, text_embeddings)
        if residuals is None:
            return self.call_network(specs.UNET, model_input, timestep, text_embeddings, adapters=adapters)[0]
        return self.call_network(specs.CONTROLLED_UNET, model_input, timestep, text_embeddings, residuals)[0]

    def _start(self, options: GenerationRequest, batch: int, scheduler, generator: torch.Generator,
               latent_parameters: torch.Tensor | None, masked_latent_parameters: torch.Tensor | None):
        """The loop's timesteps, its initial latents from the CPU generator as diffusers draws them
        (in the served precision), and for inpainting its Inpainting (pipelines/inpainting.py)."""
        if options.mask_image is not None:
            from diffusers.utils.torch_utils import randn_tensor

            timesteps = self._img2img_timesteps(scheduler, options)
            latents, inpainting = Inpainting.start(
                batch, functools.partial(self._image_latents, batch=batch, generator=generator),
                functools.partial(randn_tensor, generator=generator, device=self.device, dtype=self.dtype),
                latent_parameters, masked_latent_parameters, options, self.components.dims, scheduler, timesteps)
            return timesteps, latents, inpainting
        if latent_parameters is not None:  # image to image
            timesteps = self._img2img_timesteps(scheduler, options)
            return timesteps, self._noised_image_latents(latent_parameters, batch, scheduler, timesteps[:1],
                                                         generator), None
        dims = self.components.dims.at_size(options.height or self.components.dims.image_height,
                                            options.width or self.components.dims.image_width)
        shape = (batch, dims.latent_channels, dims.latent_height, dims.latent_width)
        latents = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        return scheduler.timesteps, latents * scheduler.init_noise_sigma, None

    @staticmethod
    def _step_kwargs(scheduler, generator: torch.Generator) -> dict:
        """As StableDiffusionPipeline's prepare_extra_step_kwargs: the generator, and its eta (0),
        where the scheduler's step takes them (DDIM's and TCD's eta: 0 samples deterministically)."""
        accepted = inspect.signature(scheduler.step).parameters
        return {key: value for key, value in (("generator", generator), ("eta", 0.0)) if key in accepted}

    def _request_scheduler(self, options: GenerationRequest):
        """A new scheduler (PNDM keeps state between steps) with the request's timesteps. They stay
        on the CPU, where it looks up its tables with them: a GPU timestep would make each step
        wait for the GPU to tell the CPU its value, which stops a GPU loop from queuing its next
        step while the UNet runs this one (step_batching.py)."""
        scheduler = self.components.new_scheduler(options.scheduler)
        scheduler.set_timesteps(options.num_inference_steps, device="cpu")
        return scheduler

    @staticmethod
    def _img2img_timesteps(scheduler, options: GenerationRequest) -> torch.Tensor:
        """The last int(steps * strength) steps of the schedule, as StableDiffusionImg2ImgPipeline
        takes them (its get_timesteps)."""
        steps = options.num_inference_steps
        start = steps - min(int(steps * options.strength), steps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        return scheduler.timesteps[start * scheduler.order:]

    def _noised_image_latents(self, latent_parameters: torch.Tensor, batch: int, scheduler,
                              first_timestep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The image's latents (as diffusers' img2img draws them: the sample first, then the
        noise), noised to the first timestep."""
        from diffusers.utils.torch_utils import randn_tensor

        latents = self._image_latents(latent_parameters, batch, generator)
        noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=self.dtype)
        return scheduler.add_noise(latents, noise, first_timestep.repeat(batch))

    def _image_latents(self, latent_parameters: torch.Tensor | None, batch: int, generator: torch.Generator,
                       name: str = specs.LATENT_PARAMETERS.name) -> torch.Tensor:
        """A sample of the VAE's latent distribution with the request's generator, scaled, repeated
        to ``batch`` rows (one image for all prompts, or one per prompt)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if latent_parameters is None:
            raise InvalidRequest(f"{name} is required here: send the VAE encoder's output for the image.")
        parameters = latent_parameters.to(device=self.device, dtype=self.dtype)
        if batch % parameters.shape[0]:
            raise InvalidRequest(f"{name} has {parameters.shape[0]} images for {batch} to make: "
                                 f"send one image per prompt, or one for all.")
        latents = DiagonalGaussianDistribution(parameters).sample(generator) * self.components.vae_scaling_factor
        return torch.cat([latents] * (batch // latents.shape[0]))

    # 6. Decode.
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        (image,) = self.call_network(specs.VAE_DECODER, latents)
        return image

    # 7. To uint8 RGB, as diffusers' VaeImageProcessor.postprocess does.
    @staticmethod
    def postprocess(decoded: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] on the CPU; an image that is not finite, or
        one flat colour, is an error that names it, never a blank picture sent as a success."""
        decoded = decoded.float()
        for index, image in enumerate(decoded):
            if not torch.isfinite(image).all():
                raise InvalidImage(f"image {index} is not finite (NaN or infinity in the VAE decoder's output): "
                                   f"the networks overflowed at this precision; try FP32 or another seed.",
                                   reason=metrics.NOT_FINITE)
            if image.amax() == image.amin():
                raise InvalidImage(f"image {index} is one flat colour ({float(image.amax()):.3g}): the networks "
                                   f"produced no picture.", reason=metrics.FLAT)
        image = (decoded / 2 + 0.5).clamp(0, 1)
        return (image.permute(0, 2, 3, 1).cpu() * 255).round().to(torch.uint8).contiguous()
