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
import secrets
import threading
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from pipelines import prompts, schedulers, sdxl
from pipelines.components import PipelineComponents
from pipelines.controlnet import Control
from pipelines.inpainting import Inpainting, masked_image
from utils import metrics, specs
from utils.added_conditions import check_added_conditions
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
                 adapters: ServedAdapters = ServedAdapters(), controlnets: tuple[str, ...] = (),
                 refiner: PipelineComponents | None = None):
        """``sizes``: the image sizes the networks are served at (default: ImageSizes.default);
        ``adapters``: the LoRA adapters served (utils/lora.py); ``controlnets``: the ControlNets, by name;
        ``refiner``: SDXL's refiner checkpoint, where served (pipelines/sdxl.py).
        ``loop_scope``: entered around each denoising loop (a UNet in the loop's own process counts
        the loops whose steps it batches, utils/python_backend/step_batching.py)."""
        self.loop_scope = loop_scope
        self.adapters = adapters
        self.controlnets = controlnets
        self.components = components
        self.family = components.family  # SD1.x or SDXL (utils/families.py): its networks
        self.sizes = sizes or specs.ImageSizes.default(components.dims)
        self._call_network = call_network  # over gRPC, by BLS, or in this process
        self.dtype = dtype  # the precision the networks are served at, as diffusers' dtype argument
        self.device = torch.device(device)
        self.max_prompts = specs.MAX_PROMPTS
        self.max_steps = max_inference_steps(components.scheduler_config)
        self._tokenizing = threading.Lock()
        # SDXL's refiner: a loop of its own over the same networks' calls (its UNet served as refiner_unet,
        # so its loop stays out of loop_scope's count: a UNet in this process gets none of its steps)
        self.refiner = None if refiner is None else StableDiffusion(refiner, call_network, dtype, device, sizes)

    def call_network(self, network: specs.NetworkSpec, *inputs: torch.Tensor,
                     adapters: tuple[tuple[str, float], ...] = ()) -> tuple[torch.Tensor, ...]:
        """Call a network and get its outputs on the loop's device, wherever it answered:
        TensorRT, and ONNX Runtime on a GPU, answer in the GPU memory they computed in."""
        return tuple(output.to(self.device) for output in self._call_network(network, *inputs, adapters=adapters))

    @property
    def takes_high_noise_frac(self) -> bool:
        """Whether high_noise_frac can be served: by a base with its refiner, or the refiner's loop."""
        return self.refiner is not None or sdxl.refines(self.family)

    def check(self, request: GenerationRequest) -> GenerationRequest:
        request = check_request(self._defaults(request), max_prompts=self.max_prompts, max_steps=self.max_steps,
                                sizes=self.sizes)
        prompts.check_clip_skip(request, self.components.dims, self.family)
        request = check_added_conditions(request, self.family, self.takes_high_noise_frac, len(request.prompt))
        self.adapters.check(request.lora, request.lora_scale)
        return check_control(request, self.controlnets, self.sizes)

    def _defaults(self, request: GenerationRequest, image_to_image: bool = False) -> GenerationRequest:
        """The family's diffusers defaults where the request gives none: its guidance scale, and
        image to image's strength (``image_to_image``: a step given the image's latents, not the image)."""
        if request.guidance_scale is None:
            request = replace(request, guidance_scale=self.family.default_guidance_scale)
        if request.strength is None and (request.image is not None or image_to_image) and request.mask_image is None:
            return replace(request, strength=self.family.default_strength)
        return request

    def check_options(self, request: GenerationRequest, image_to_image: bool) -> GenerationRequest:
        request = check_options(self._defaults(request, image_to_image), self.max_steps, image_to_image, self.sizes)
        request = check_added_conditions(request, self.family, self.takes_high_noise_frac)
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
            return tuple(torch.zeros(network.shape(t, inputs[0].shape[0], dims), dtype=self.dtype, device=self.device)
                         for t in network.outputs)

        idle = StableDiffusion(self.components, zeros, self.dtype, self.device, self.sizes)
        request = GenerationRequest(prompt="warm-up", num_inference_steps=steps, seed=0)
        if tokenize:
            embeddings = idle.encode_prompt(request)
        else:
            embeddings = prompts.PromptEmbeddings(torch.zeros(2, dims.prompt_length, dims.unet_text_hidden),
                                                  torch.zeros(2, dims.pooled_dim) if dims.pooled_dim else None)
        idle.decode(idle.denoise(embeddings.text, request, pooled_embeddings=embeddings.pooled))

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
        embeddings = self.encode_prompt(request, rows)
        inpainting_unet = request.mask_image is not None and self.components.dims.inpainting_unet
        latent_parameters = masked = None  # an inpainting UNet is shown the masked image; a plain one blends
        if request.image is not None and not (inpainting_unet and request.strength == 1.0):  # (from noise)
            latent_parameters = self.encode_image(request.image)
        if inpainting_unet:
            masked = self.encode_image(request.image, request.mask_image)
        latents = self.denoise(embeddings.text, request, latent_parameters, progress, is_cancelled, on_step,
                               masked_latent_parameters=masked, pooled_embeddings=embeddings.pooled)
        if request.high_noise_frac is not None:  # SDXL's refiner takes the last steps (pipelines/sdxl.py)
            refined = self.refiner.encode_prompt(request)
            latents = self.refiner.denoise(refined.text, request, progress=progress, is_cancelled=is_cancelled,
                                           on_step=on_step, pooled_embeddings=refined.pooled, base_latents=latents)
        return Generated(self.postprocess(self.decode(latents)), rows.truncated)

    # 1. Tokenize: the rows each text encoder encodes, unconditional prompts first (the specs' CFG
    # order): a row per chunk of a long prompt, more for a weighted one (pipelines/prompts.py).
    def tokenize(self, request: GenerationRequest) -> prompts.PromptRows:
        with self._tokenizing:  # a fast tokenizer sets its padding per call: one thread at a time
            rows = prompts.plan(self.components.text_encoding, request)
        return prompts.PromptRows(tuple(prompts.EncoderRows(*(t.to(self.device) for t in (
            encoder.input_ids, encoder.attention_mask, encoder.skipped_layers))) for encoder in rows.encoders),
            rows.truncated)

    # 2. One call of each text encoder on its rows (plan refuses more than its batch profile takes),
    # with the request's LoRA adapters where the text encoder applies them; then the UNet's conditioning.
    def encode_prompt(self, request: GenerationRequest,
                      rows: prompts.PromptRows | None = None) -> prompts.PromptEmbeddings:
        rows = rows or self.tokenize(request)
        outputs = [self.call_network(network, encoder.input_ids, encoder.attention_mask, encoder.skipped_layers,
                                     adapters=request.adapters)
                   for network, encoder in zip(self.family.text_encoders, rows.encoders)]
        pooled = next((output[1] for output in outputs if len(output) > 1), None)  # SDXL's second text encoder's
        return self.prompt_embeds(request, tuple(output[0] for output in outputs), pooled)

    def prompt_embeds(self, request: GenerationRequest, encoded: tuple[torch.Tensor, ...],
                      pooled: torch.Tensor | None = None) -> prompts.PromptEmbeddings:
        """The UNet's conditioning from the text encoders' rows (compel's arithmetic, on the CPU)."""
        with self._tokenizing:
            embeddings = prompts.assemble(self.components.text_encoding, request, tuple(e.cpu() for e in encoded),
                                          None if pooled is None else pooled.cpu())
        return embeddings.to(self.device)

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
                masked_latent_parameters: torch.Tensor | None = None, pooled_embeddings: torch.Tensor | None = None,
                base_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Latents for the VAE decoder (unscaled) from the text embeddings (and, for image to image, the
        VAE encoder's parameters); ``options``: guidance, steps, seed, strength, scheduler, images per
        prompt, for text to image the size (default: the checkpoint's), and for inpainting the mask (with
        an inpainting UNet, ``masked_latent_parameters`` too). ``on_step(done, total, latents)`` after each
        step (a streaming model's previews). SDXL: ``pooled_embeddings``, a row per text as the text
        embeddings; its refiner continues the base's ``base_latents`` (its denoise's; pipelines/sdxl.py)."""
        options = self._defaults(options)  # (a caller that did not check it: the family's guidance)
        cfg = options.do_classifier_free_guidance
        text_embeddings = self._rows_per_image(text_embeddings, options)
        batch = text_embeddings.shape[0] // 2 if cfg else text_embeddings.shape[0]
        generator = torch.Generator().manual_seed(options.seed if options.seed is not None else secrets.randbits(63))

        # 3. A scheduler of this request's own; 4. the initial latents.
        scheduler = schedulers.request_scheduler(self.components, options)
        step_kwargs = schedulers.step_kwargs(scheduler, generator)
        timesteps, latents, inpainting = self._start(options, batch, scheduler, generator, latent_parameters,
                                                     masked_latent_parameters, base_latents)
        scale = self.components.dims.vae_scale_factor  # SDXL's time ids: the image's size in pixels
        added = sdxl.added_inputs(options, self.family, pooled_embeddings, latents.shape[2] * scale,
                                  latents.shape[3] * scale, cfg, text_embeddings)
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
                noise = self._predict_noise(model_input, timestep, text_embeddings, adapters, control, done, added)
                if cfg:
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + options.guidance_scale * (noise_text - noise_uncond)
                latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                if inpainting is not None:
                    latents = inpainting.blend(latents, done, timesteps, scheduler)
                if cfg and done == cutoff:
                    cfg, text_embeddings = False, text_embeddings.chunk(2)[1]
                    added = tuple(tensor.chunk(2)[1] for tensor in added)
                if on_step is not None:
                    on_step(done + 1, len(timesteps), latents)
        return latents / self.components.vae_scaling_factor

    def _rows_per_image(self, text_embeddings: torch.Tensor, options: GenerationRequest) -> torch.Tensor:
        """The text embeddings on the loop's device, each prompt's rows repeated num_images_per_prompt
        times, as diffusers' encode_prompt does."""
        rows = text_embeddings.shape[0]
        if options.do_classifier_free_guidance and rows % 2:
            raise InvalidRequest(f"text_embeddings has {rows} rows: with guidance_scale > 1 send the unconditional "
                                 f"and the conditional rows of each prompt (an even number).")
        text_embeddings = text_embeddings.to(device=self.device, dtype=self.dtype)
        return text_embeddings.repeat_interleave(options.num_images_per_prompt, dim=0)

    def _predict_noise(self, model_input: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                       adapters: tuple[tuple[str, float], ...], control: Control | None, done: int,
                       added: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """The UNet's call at step ``done`` (SDXL's with its ``added`` conditions); where ControlNets
        act at this step, with their residuals, after calling them (pipelines/controlnet.py)."""
        residuals = control and control.residuals(self.call_network, done, model_input, timestep, text_embeddings)
        if residuals is None:
            return self.call_network(self.family.unet, model_input, timestep, text_embeddings, *added,
                                     adapters=adapters)[0]
        return self.call_network(specs.CONTROLLED_UNET, model_input, timestep, text_embeddings, residuals)[0]

    def _start(self, options: GenerationRequest, batch: int, scheduler, generator: torch.Generator,
               latent_parameters: torch.Tensor | None, masked_latent_parameters: torch.Tensor | None,
               base_latents: torch.Tensor | None):
        """The loop's timesteps, its initial latents, and for inpainting its Inpainting; SDXL's base
        stops where its refiner starts, which continues the base's latents (pipelines/sdxl.py)."""
        if sdxl.refines(self.family):
            if base_latents is None:
                raise InvalidRequest(f"{specs.LATENTS.name} is required: the refiner continues the base's latents.")
            latents = base_latents.to(device=self.device, dtype=self.dtype) * self.components.vae_scaling_factor
            return sdxl.refiner_timesteps(scheduler, options), latents, None
        timesteps, latents, inpainting = self._first_latents(options, batch, scheduler, generator, latent_parameters,
                                                             masked_latent_parameters)
        return sdxl.base_timesteps(timesteps, options, self.family, scheduler), latents, inpainting

    def _first_latents(self, options: GenerationRequest, batch: int, scheduler, generator: torch.Generator,
                       latent_parameters: torch.Tensor | None, masked_latent_parameters: torch.Tensor | None):
        """The timesteps, the initial latents from the CPU generator as diffusers draws them (in the
        served precision), and for inpainting its Inpainting (pipelines/inpainting.py)."""
        if options.mask_image is not None:
            from diffusers.utils.torch_utils import randn_tensor

            timesteps = schedulers.img2img_timesteps(scheduler, options)
            latents, inpainting = Inpainting.start(
                batch, functools.partial(self._image_latents, batch=batch, generator=generator),
                functools.partial(randn_tensor, generator=generator, device=self.device, dtype=self.dtype),
                latent_parameters, masked_latent_parameters, options, self.components.dims, scheduler, timesteps)
            return timesteps, latents, inpainting
        if latent_parameters is not None:  # image to image
            timesteps = schedulers.img2img_timesteps(scheduler, options)
            return timesteps, self._noised_image_latents(latent_parameters, batch, scheduler, timesteps[:1],
                                                         generator), None
        dims = self.components.dims.at_size(options.height or self.components.dims.image_height,
                                            options.width or self.components.dims.image_width)
        shape = (batch, dims.latent_channels, dims.latent_height, dims.latent_width)
        latents = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        return scheduler.timesteps, latents * scheduler.init_noise_sigma, None

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
