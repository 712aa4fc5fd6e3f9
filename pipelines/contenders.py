"""The pipelines the benchmark compares (utils/benchmark measures them): diffusers as a user would
run it instead, and the three Triton ways. Each makes a client: ``generate(**options) -> images``,
and says its configuration in one line (``configuration()``).

Adding a contender is a class here and one line in CONTENDERS.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from utils.families import SDXL, family_of
from utils.model_dims import ModelDims
from utils.benchmark.settings import CONTROLNET, IMAGE_TASKS, Context


class DiffusersContender:
    """Plain diffusers.StableDiffusionPipeline in this process: the baseline."""

    served = False
    bounds_serving = False  # its N images in one call are the bound for N concurrent clients
    def __init__(self, context: Context):
        import diffusers
        import torch
        from diffusers import StableDiffusionPipeline

        self.torch = torch
        settings = context.settings
        dtype = {"FP32": torch.float32, "FP16": torch.float16}[settings.precision]
        sdxl = family_of(ModelDims.from_pretrained(context.model_dir)) is SDXL  # (utils/families.py)
        if sdxl:
            self.pipeline = diffusers.StableDiffusionXLPipeline.from_pretrained(context.model_dir, dtype=dtype)
        else:
            self.pipeline = StableDiffusionPipeline.from_pretrained(
                context.model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False)
        self.pipeline.to(settings.device)
        if settings.task in IMAGE_TASKS:  # the same components, the image-to-image or inpainting loop
            from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

            task = StableDiffusionInpaintPipeline if settings.task == "inpaint" else StableDiffusionImg2ImgPipeline
            if sdxl and task is StableDiffusionImg2ImgPipeline:
                task = diffusers.StableDiffusionXLImg2ImgPipeline
            self.pipeline = task(**self.pipeline.components)
        if settings.task == CONTROLNET:  # the same components with the deployment's ControlNet
            from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

            (folder,) = context.controlnet_folders.values()
            controlnet = ControlNetModel.from_pretrained(folder, dtype=dtype).to(settings.device)
            self.pipeline = StableDiffusionControlNetPipeline(**self.pipeline.components, controlnet=controlnet)
        self.pipeline.set_progress_bar_config(disable=True)
        diffusers.utils.logging.set_verbosity_error()  # no per-call prompt truncation warnings
        self.diffusers_version, self.device, self.precision = diffusers.__version__, settings.device, settings.precision
        # The deployment's LoRA adapters, loaded as a diffusers user loads them; a request's are
        # set on the UNet module itself (a compiled UNet's wrapper does not list them).
        for name, path in context.adapter_files.items():
            self.pipeline.load_lora_weights(str(path), adapter_name=name)
        self.unet, self.adapters_in_use = self.pipeline.unet, None
        self.schedulers = {None: self.pipeline.scheduler}

    def client(self):
        return self

    def configuration(self) -> str:
        return f"diffusers {self.diffusers_version}, eager, {self.device} {self.precision}{self.adapters_note()}"

    def adapters_note(self) -> str:
        names = list(getattr(self.unet, "peft_config", {}))
        return f", LoRA {' and '.join(names)} chosen per request with set_adapters" if names else ""

    def compilations(self) -> int:
        """How many graphs torch.compile has built so far (a run that builds one is not a measurement)."""
        return 0

    def use(self, lora=(), lora_scale=None, scheduler=None) -> None:
        """A request's adapters and scheduler, switched when they change (as a user of diffusers
        switches them): the adapters with set_adapters, the scheduler built from the checkpoint's."""
        adapters = (tuple(lora), tuple(lora_scale or [1.0] * len(lora)))
        if adapters != self.adapters_in_use and hasattr(self.unet, "peft_config"):
            if lora:
                self.unet.enable_lora()
                self.unet.set_adapters(list(lora), list(adapters[1]))
            else:
                self.unet.disable_lora()
            self.adapters_in_use = adapters
        if scheduler not in self.schedulers:
            import diffusers

            self.schedulers[scheduler] = getattr(diffusers, scheduler).from_config(self.schedulers[None].config)
        self.pipeline.scheduler = self.schedulers[scheduler]

    def __call__(self, prompt, seed, image=None, mask_image=None, lora=(), lora_scale=None, scheduler=None,
                 control_image=None, controlnet=(), **options) -> np.ndarray:
        """One call of the pipeline; a list of prompts (and as many pictures) makes one batch."""
        from PIL import Image

        self.use(lora, lora_scale, scheduler)
        generator = self.torch.Generator().manual_seed(seed)
        if image is not None:  # as PIL images: diffusers scales them to [-1, 1] as the served pipelines do
            options.update(image=[Image.fromarray(picture) for picture in image])
        if control_image is not None:  # ControlNet's pipeline (of the one ControlNet named) takes them as its image
            options.update(image=[Image.fromarray(picture) for picture in control_image])
        if mask_image is not None:  # grey levels, at the picture's own size (diffusers' default: the checkpoint's)
            options.update(mask_image=[Image.fromarray(mask) for mask in mask_image], height=image.shape[1],
                           width=image.shape[2])
        images = self.pipeline(prompt, generator=generator, output_type="pil", **options).images
        return np.stack([np.asarray(picture) for picture in images])

    def stage_timers(self, totals: dict[str, float], calls: dict[str, int]):
        """Time the networks' forward calls (synchronizing the GPU, so only while profiling)."""
        # vae.decoder: all of the VAE decoder network but its first 1x1 convolution (post_quant_conv).
        modules = {"text_encoder": self.pipeline.text_encoder, **self._text_encoder_2(), "unet": self.pipeline.unet,
                   "vae_encoder": self.pipeline.vae.encoder, "vae_decoder": self.pipeline.vae.decoder,
                   **self._controlnet()}
        return self._timers(modules, totals, calls)

    def _text_encoder_2(self) -> dict:
        """SDXL's second text encoder, to time it."""
        encoder = getattr(self.pipeline, "text_encoder_2", None)
        return {"text_encoder_2": encoder} if encoder is not None else {}

    def _controlnet(self) -> dict:
        """The ControlNet's module where the pipeline has one (the controlnet task), to time it."""
        return {"controlnet": self.pipeline.controlnet} if hasattr(self.pipeline, "controlnet") else {}

    @contextmanager
    def _timers(self, modules: dict, totals: dict[str, float], calls: dict[str, int]):
        starts, handles = {}, []

        def sync():
            if self.torch.cuda.is_available():
                self.torch.cuda.synchronize()

        for stage, module in modules.items():
            def before(_module, _inputs, stage=stage):
                sync()
                starts[stage] = time.perf_counter()

            def after(_module, _inputs, _outputs, stage=stage):
                sync()
                totals[stage] = totals.get(stage, 0.0) + time.perf_counter() - starts[stage]
                calls[stage] = calls.get(stage, 0) + 1

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class CompiledDiffusersContender(DiffusersContender):
    """diffusers with its UNet under torch.compile(mode="reduce-overhead"): the strongest plain
    PyTorch baseline on a GPU (compiling takes a minute or more, spent in the warm-up runs)."""

    def __init__(self, context: Context):
        super().__init__(context)
        self.pipeline.unet = self.torch.compile(self.pipeline.unet, mode="reduce-overhead", fullgraph=True)

    def configuration(self) -> str:
        return (f"diffusers {self.diffusers_version}, UNet compiled (reduce-overhead), {self.device} {self.precision}"
                f"{self.adapters_note()}")

    def compilations(self) -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])


class FastDiffusersContender(CompiledDiffusersContender):
    """diffusers as its own guide to a faster pipeline teaches, with every trick the served networks
    get (utils/python_backend/cuda_graphs.py): one projection for q, k and v, NHWC UNet and VAE,
    1x1 convolutions as matmuls, the UNet and the VAE decoder compiled (reduce-overhead, full
    graph, one static shape each: a batch of another size compiles again), cuDNN attention first.
    Its N images in one call are the bound for serving N concurrent clients: the same kernels,
    the ideal batch. The guide's max-autotune is left out: it tunes for many minutes per shape.

    On a CPU the networks are not compiled (Inductor's CPU kernels are another recipe, and a
    minute or more per shape): the rest of the recipe runs."""

    bounds_serving = True

    def __init__(self, context: Context):
        DiffusersContender.__init__(self, context)
        torch, pipeline = self.torch, self.pipeline
        # One projection for q, k and v would bypass LoRA layers on them: not with adapters.
        self.fused_qkv = not context.adapter_files
        if self.fused_qkv:
            pipeline.fuse_qkv_projections()
        controlnet = getattr(pipeline, "controlnet", None)  # the controlnet task's: the UNet's recipe too
        if controlnet is not None and self.fused_qkv:
            controlnet.fuse_qkv_projections()
        for module in (pipeline.unet, pipeline.vae, *([controlnet] if controlnet is not None else [])):
            module.to(memory_format=torch.channels_last)
        self.compiled = self.device == "cuda"
        if self.compiled:
            torch._inductor.config.conv_1x1_as_mm = True
            compile_options = dict(mode="reduce-overhead", fullgraph=True, dynamic=False)
            pipeline.unet = torch.compile(pipeline.unet, **compile_options)
            pipeline.vae.decode = torch.compile(pipeline.vae.decode, **compile_options)
            if controlnet is not None:
                pipeline.controlnet = torch.compile(controlnet, **compile_options)

    @contextmanager
    def stage_timers(self, totals: dict[str, float], calls: dict[str, int]):
        """As diffusers', but the VAE decoder timed around the compiled ``vae.decode`` (its whole
        network, post_quant_conv included): the hooks of a module inside a compiled graph do not run."""
        vae = self.pipeline.vae
        modules = {"text_encoder": self.pipeline.text_encoder, **self._text_encoder_2(), "unet": self.pipeline.unet,
                   "vae_encoder": vae.encoder,
                   **self._controlnet()}
        decode = vae.decode

        def timed_decode(*args, **kwargs):
            if self.torch.cuda.is_available():
                self.torch.cuda.synchronize()
            start = time.perf_counter()
            output = decode(*args, **kwargs)
            if self.torch.cuda.is_available():
                self.torch.cuda.synchronize()
            totals["vae_decoder"] = totals.get("vae_decoder", 0.0) + time.perf_counter() - start
            calls["vae_decoder"] = calls.get("vae_decoder", 0) + 1
            return output

        vae.decode = timed_decode
        try:
            with self._timers(modules, totals, calls):
                yield
        finally:
            vae.decode = decode

    def configuration(self) -> str:
        networks = "UNet, ControlNet and VAE decoder" if self._controlnet() else "UNet and VAE decoder"
        compiled = (f"{networks} compiled (reduce-overhead, full graph, static shapes)" if self.compiled
                    else "not compiled on the CPU")
        qkv = "fused QKV" if self.fused_qkv else "QKV not fused (LoRA layers on them)"
        return (f"diffusers {self.diffusers_version}, {qkv}, channels_last UNet and VAE, 1x1 convolutions as "
                f"matmuls, {compiled}, cuDNN attention first, {self.device} {self.precision}{self.adapters_note()}")

    def __call__(self, prompt, seed, **options) -> np.ndarray:
        from utils.python_backend.cuda_graphs import ATTENTION_BACKENDS

        with self.torch.nn.attention.sdpa_kernel(ATTENTION_BACKENDS, set_priority=True):
            return super().__call__(prompt, seed, **options)


class ServedContender:
    """A Triton way, measured against the server at the context's address."""

    served = True
    bounds_serving = False

    def __init__(self, context: Context):
        self.context = context

    def configuration(self) -> str:
        deployment = self.context.settings.deployment
        placement = deployment.placement
        runtime = f", {deployment.runtime} runtime" if deployment.backend == "python" else ""
        compiled = f" ({' and '.join(deployment.torch_compile)} compiled)" if deployment.torch_compile else ""
        return (f"{self.way}: {deployment.backend} backend{runtime}{compiled}, {deployment.device} "
                f"{deployment.served_precision}, --pipeline-loop {placement.pipeline_loop}, "
                f"--pipeline-instances {placement.pipeline_instances}")

    def compilations(self) -> int:
        return 0


class ClientSideContender(ServedContender):
    """pipelines/client_side.py: the loop here, each network a gRPC call."""

    way = "the loop in this process, each network a gRPC call"

    def client(self):
        from pipelines.client_side import ClientSidePipeline

        pipeline = ClientSidePipeline(self.context.model_dir, self.context.url, timeout=None)
        return lambda **options: pipeline(progress=False, **options)


class BlsContender(ServedContender):
    """triton/models/pipeline_*: one request, the loop inside Triton."""

    way = "one request, the loop in a Python model"

    def client(self):
        from pipelines.bls import BlsPipeline

        return BlsPipeline(self.context.url, timeout=None)


class EnsembleContender(BlsContender):
    """triton/models/ensemble_*: one request, a graph of models that Triton runs itself."""

    way = "one request, an ensemble of ensembles"

    def client(self):
        from pipelines.ensemble import EnsemblePipeline

        return EnsemblePipeline(self.context.url, timeout=None)


class OpenAIGatewayContender(ServedContender):
    """pipelines/openai_gateway.py: OpenAI's images API in front of the BLS pipelines, called with
    the openai SDK as its users call it (PNG in base64 back): what the gateway adds to BLS."""

    way = "OpenAI's images API (the gateway, then the BLS pipeline), called with the openai SDK"
    _address: tuple[str, str] | None = None

    def client(self):
        from openai import OpenAI

        from pipelines.openai_images import from_png_base64, png

        base_url, api_key = self._gateway()
        sdk = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=None)

        def generate(prompt, image=None, mask_image=None, **options):
            if image is None:
                response = sdk.images.generate(prompt=prompt, response_format="b64_json", extra_body=options)
            else:
                files = {"mask": ("mask.png", png(np.asarray(mask_image).reshape(image.shape[-3:-1])))} \
                    if mask_image is not None else {}
                response = sdk.images.edit(image=("image.png", png(np.asarray(image).reshape(image.shape[-3:]))),
                                           prompt=prompt, response_format="b64_json", extra_body=options, **files)
            return np.stack([from_png_base64(datum.b64_json) for datum in response.data])

        return generate

    def _gateway(self) -> tuple[str, str]:
        """One gateway for all the clients of the run, in this process, against the measured server."""
        if self._address is None:
            import secrets

            from pipelines.openai_gateway import serve_in_thread
            from pipelines.openai_images import Served
            from utils import specs
            from utils.gateway import DEFAULT_SERVED_MODEL

            dims = specs.ModelDims.from_pretrained(self.context.model_dir)
            served = Served(DEFAULT_SERVED_MODEL, self.context.settings.deployment.sizes(dims),
                            (dims.image_height, dims.image_width))
            api_key = secrets.token_hex(24)
            type(self)._address = (serve_in_thread(self.context.url, api_key, served), api_key)
        return self._address


CONTENDERS = {
    "diffusers": DiffusersContender,
    "diffusers-compiled": CompiledDiffusersContender,
    "diffusers-fast": FastDiffusersContender,
    "triton-client-side": ClientSideContender,
    "triton-bls": BlsContender,
    "triton-ensemble": EnsembleContender,
    "openai-gateway": OpenAIGatewayContender,
}
# What a benchmark runs unless --pipelines says otherwise: the gateway is measured where asked for.
DEFAULT_CONTENDERS = tuple(name for name in CONTENDERS if name != "openai-gateway")
