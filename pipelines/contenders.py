"""The pipelines the benchmark compares (utils/benchmark measures them): diffusers as a user would
run it instead, and the three Triton ways. Each makes a client: ``generate(**options) -> images``.

Adding a contender is a class here and one line in CONTENDERS.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from utils.benchmark.settings import Context


class DiffusersContender:
    """Plain diffusers.StableDiffusionPipeline in this process: the baseline."""

    served = False

    def __init__(self, context: Context):
        import diffusers
        import torch
        from diffusers import StableDiffusionPipeline

        self.torch = torch
        settings = context.settings
        dtype = {"FP32": torch.float32, "FP16": torch.float16}[settings.precision]
        self.pipeline = StableDiffusionPipeline.from_pretrained(
            context.model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False
        ).to(settings.device)
        if settings.task == "image-to-image":  # the same components, the image-to-image loop
            from diffusers import StableDiffusionImg2ImgPipeline

            self.pipeline = StableDiffusionImg2ImgPipeline(**self.pipeline.components)
        self.pipeline.set_progress_bar_config(disable=True)
        diffusers.utils.logging.set_verbosity_error()  # no per-call prompt truncation warnings

    def client(self):
        return self

    def compilations(self) -> int:
        """How many graphs torch.compile has built so far (a run that builds one is not a measurement)."""
        return 0

    def __call__(self, prompt, seed, image=None, **options) -> np.ndarray:
        from PIL import Image

        generator = self.torch.Generator().manual_seed(seed)
        if image is None:
            images = self.pipeline(prompt, generator=generator, output_type="pil", **options).images
        else:  # as PIL images: diffusers scales them to [-1, 1] as the served pipelines do
            pictures = [Image.fromarray(picture) for picture in image]
            images = self.pipeline(prompt, image=pictures, generator=generator, output_type="pil", **options).images
        return np.stack([np.asarray(picture) for picture in images])

    @contextmanager
    def stage_timers(self, totals: dict[str, float], calls: dict[str, int]):
        """Time the three networks' forward calls (synchronizing the GPU, so only while profiling)."""
        # vae.decoder: all of the VAE decoder network but its first 1x1 convolution (post_quant_conv).
        modules = {"text_encoder": self.pipeline.text_encoder, "unet": self.pipeline.unet,
                   "vae_encoder": self.pipeline.vae.encoder, "vae_decoder": self.pipeline.vae.decoder}
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

    def compilations(self) -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])


class ClientSideContender:
    """pipelines/client_side.py: the loop here, each network a gRPC call."""

    served = True

    def __init__(self, context: Context):
        self.context = context

    def client(self):
        from pipelines.client_side import ClientSidePipeline

        pipeline = ClientSidePipeline(self.context.model_dir, self.context.url, timeout=None)
        return lambda **options: pipeline(progress=False, **options)

    def compilations(self) -> int:
        return 0


class BlsContender:
    """triton/models/pipeline_*: one request, the loop inside Triton."""

    served = True

    def __init__(self, context: Context):
        self.context = context

    def client(self):
        from pipelines.bls import BlsPipeline

        return BlsPipeline(self.context.url, timeout=None)

    def compilations(self) -> int:
        return 0


class EnsembleContender(BlsContender):
    """triton/models/ensemble_*: one request, a graph of models that Triton runs itself."""

    def client(self):
        from pipelines.ensemble import EnsemblePipeline

        return EnsemblePipeline(self.context.url, timeout=None)


CONTENDERS = {
    "diffusers": DiffusersContender,
    "diffusers-compiled": CompiledDiffusersContender,
    "triton-client-side": ClientSideContender,
    "triton-bls": BlsContender,
    "triton-ensemble": EnsembleContender,
}
