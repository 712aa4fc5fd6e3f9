"""Client-side pipeline: this process runs the loop and calls each network on Triton over gRPC.

(Earlier Triton tutorials called this way the "ensemble" pipeline; it is not a Triton ensemble,
which is a graph Triton runs itself: pipelines/ensemble.py.)

Every step crosses the network (2 tensors of latents and one of text embeddings per UNet call),
which is what the server-side BLS pipeline (pipelines/bls.py) saves. The loop itself is the one
in pipelines/stable_diffusion.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from pipelines.components import PipelineComponents
from pipelines.prompts import warn_if_truncated
from pipelines.stable_diffusion import StableDiffusion
from utils import specs
from utils.controlnet import listed_controlnets
from utils.errors import UsageError
from utils.grpc_client import DEFAULT_RETRY_FOR, DEFAULT_URL, call_with_retries, check_server, connect, infer_inputs
from utils.layout import served_name
from utils.lora import CONFIG_PARAMETER, ServedAdapters
from utils.networks import TORCH_DTYPES
from utils.request import GenerationRequest


class TritonNetworks:
    """Calls the component models over gRPC, in the dtypes their served configs declare."""

    def __init__(self, url: str, timeout: float | None = 60.0, retry_for: float = DEFAULT_RETRY_FOR,
                 gpu: int | None = None):
        self.client = connect(url)
        self.gpu = gpu  # on a server with a copy of each network per GPU: the copies on this GPU
        self.timeout = timeout  # per network call
        self.retry_for = retry_for  # how long to keep retrying retryable failures (0: never)
        self._configs: dict[str, dict] = {}
        self.adapters = ServedAdapters()  # the server's, once it is known to serve the UNet (ClientSidePipeline)

    def served_name(self, network: specs.NetworkSpec, adapter: str | None = None) -> str:
        return served_name(network.name, self.gpu, adapter)

    def serves_adapter(self, adapter: str) -> bool:
        """Whether the server serves the UNet of this LoRA adapter (readiness is open to anyone;
        the repository's index needs the admin key)."""
        try:
            return self.client.is_model_ready(self.served_name(specs.UNET, adapter))
        except InferenceServerException:
            return False

    def served_config(self, network: specs.NetworkSpec) -> dict:
        name = self.served_name(network)
        if name not in self._configs:
            self._configs[name] = call_with_retries(
                lambda: self.client.get_model_config(name, as_json=True)["config"], self.retry_for)
        return self._configs[name]

    def precision(self) -> str:
        """The precision the networks are served at: the UNet's sample dtype (FP32 or FP16)."""
        sample = next(t for t in self.served_config(specs.UNET)["input"] if t["name"] == specs.UNET.inputs[0].name)
        return sample["data_type"].removeprefix("TYPE_")

    def served_adapters(self) -> ServedAdapters:
        """The LoRA adapters this server serves: those its UNet applies in place (named in its
        config), or, fused, each as a UNet of its own, asked for by name."""
        parameters = self.served_config(specs.UNET).get("parameters", {})
        in_place = parameters.get(CONFIG_PARAMETER, {}).get("string_value")
        if in_place:
            return ServedAdapters(tuple(in_place.split(",")), in_place=True)
        return ServedAdapters(served=self.serves_adapter)

    def served_controlnets(self) -> tuple[str, ...]:
        """The ControlNets this server serves, by name: as the controlled UNet's config lists them
        (none without one)."""
        if not self.client.is_model_ready(self.served_name(specs.CONTROLLED_UNET)):
            return ()
        return listed_controlnets(self.served_config(specs.CONTROLLED_UNET))

    def __call__(self, network: specs.NetworkSpec, *tensors: torch.Tensor,
                 adapters: tuple[tuple[str, float], ...] = ()) -> tuple[torch.Tensor, ...]:
        """Call the network (the UNet with LoRA ``adapters``: where the server's adapters route it)."""
        adapter, parameters = self.adapters.route(adapters, network.name)
        served = {t["name"]: t["data_type"].removeprefix("TYPE_") for t in self.served_config(network)["input"]}
        inputs = infer_inputs({
            spec.name: spec.to_wire(tensor.detach().cpu().numpy().astype(triton_to_np_dtype(served[spec.name]), copy=False))
            for spec, tensor in zip(network.inputs, tensors)
        })
        outputs = [grpcclient.InferRequestedOutput(name) for name in network.output_names]
        result = call_with_retries(  # one network call is idempotent: safe to repeat
            lambda: self.client.infer(self.served_name(network, adapter), inputs, outputs=outputs,
                                      client_timeout=self.timeout, parameters=parameters or None),
            self.retry_for,
        )
        return tuple(torch.from_numpy(result.as_numpy(name).copy()) for name in network.output_names)


class ClientSidePipeline:
    """Text to image, image to image and inpainting, orchestrated here, each network served by Triton."""

    def __init__(self, model_dir: str | Path, url: str = DEFAULT_URL, timeout: float | None = 60.0,
                 retry_for: float = DEFAULT_RETRY_FOR, gpu: int | None = None,
                 sizes: specs.ImageSizes | None = None, refiner: str | Path | None = None):
        """``gpu``: on a server that serves a copy of each network per GPU (``unet_gpu0``, ...),
        call the copies on this GPU; ``sizes``: the image sizes the server was written for, where
        not the default (--image-sizes); ``refiner``: SDXL's refiner's folder, where the server
        serves it (refiner_unet), for requests with high_noise_frac."""
        self.networks = TritonNetworks(url, timeout, retry_for, gpu)
        check_server(self.networks.client, url)
        try:
            dtype = TORCH_DTYPES[self.networks.precision()]
        except InferenceServerException as error:
            name = self.networks.served_name(specs.UNET)
            raise UsageError(f"the server at {url} does not serve {name!r} ({error.message()}): where each GPU "
                             f"serves its own copy of the networks, pass gpu=N (--gpu N).") from None
        self.networks.adapters = self.networks.served_adapters()
        self.loop = StableDiffusion(PipelineComponents.from_pretrained(model_dir).load(), self.networks, dtype=dtype,
                                    sizes=sizes, adapters=self.networks.adapters,
                                    controlnets=self.networks.served_controlnets(),
                                    refiner=None if refiner is None else PipelineComponents.from_pretrained(refiner).load())

    def __call__(self, prompt: str | list[str], progress: bool = True, **options) -> np.ndarray:
        """Return uint8 images [N, H, W, 3]. ``options``: the other GenerationRequest fields
        (negative_prompt, image and strength for image to image, mask_image to inpaint, scheduler,
        num_images_per_prompt, height and width, guidance_scale, cfg_cutoff_step_ratio,
        num_inference_steps, seed, lora and lora_scale, and ControlNet's: controlnet, control_image, ...)."""
        request = GenerationRequest(prompt=prompt, **options)
        generated = self.loop.generate(request, progress=progress)
        warn_if_truncated(generated.truncated)
        return generated.images.numpy()
