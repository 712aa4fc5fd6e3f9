"""A pipeline served as one model: one gRPC request in, the images out.

What the BLS pipelines (pipelines/bls.py) and the ensembles (pipelines/ensemble.py) have in
common as seen from a client: the same inputs, named as diffusers names its arguments, and the
same output. Only the model a request goes to differs, and whether the request has an ``image``
(and a ``mask_image``) decides between text to image, image to image and inpainting.
"""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from pipelines.prompts import warn_if_truncated
from utils import specs
from utils.grpc_client import DEFAULT_RETRY_FOR, DEFAULT_URL, call_with_retries, check_server, connect, infer_inputs
from utils.request import GenerationRequest, check_before_sending, request_to_arrays


class ServedPipeline:
    text_to_image: specs.PipelineSpec | specs.EnsembleSpec
    image_to_image: specs.PipelineSpec | specs.EnsembleSpec
    inpaint: specs.PipelineSpec | specs.EnsembleSpec
    controlnet: specs.PipelineSpec | specs.EnsembleSpec  # text to image with a control image

    def __init__(self, url: str = DEFAULT_URL, timeout: float | None = 600.0, retry_for: float = DEFAULT_RETRY_FOR):
        self.client = connect(url)
        check_server(self.client, url)
        self.timeout = timeout  # per request; the server stops working on it when it expires
        self.retry_for = retry_for  # how long to keep retrying retryable failures (0: never)

    def __call__(self, prompt: str | list[str] = (), **options) -> np.ndarray:
        """Return uint8 images [N, H, W, 3]. ``options``: the other GenerationRequest fields
        (negative_prompt, image and strength for image to image, mask_image to inpaint, scheduler,
        num_images_per_prompt, height and width, guidance_scale, num_inference_steps, seed, lora
        and lora_scale, control_image and the other ControlNet inputs)."""
        # The shared checks first, as the client-side pipeline does: a bad value gets the server's
        # message without a round trip (the server checks again, and knows the step cap and sizes).
        request = check_before_sending(GenerationRequest(prompt=prompt, **options))
        spec = self.model_for(request)
        return self.infer(request_to_arrays(request, spec), spec, self.parameters(request))

    def model_for(self, request: GenerationRequest) -> specs.PipelineSpec | specs.EnsembleSpec:
        """The served model a request goes to."""
        return (self.controlnet if request.control_image is not None else self.text_to_image if request.image is None
                else self.image_to_image if request.mask_image is None else self.inpaint)

    def parameters(self, request: GenerationRequest) -> dict[str, str]:
        """The request parameters that go with the inputs (none here)."""
        return {}

    def infer(self, arrays: dict[str, np.ndarray], spec=None, parameters: dict[str, str] | None = None) -> np.ndarray:
        """Send these input tensors as they are (the server validates them), with ``parameters``."""
        spec = spec or self.text_to_image
        inputs = infer_inputs(arrays)
        images, truncated = spec.outputs
        outputs = [grpcclient.InferRequestedOutput(tensor.name) for tensor in (images, truncated)]
        result = call_with_retries(
            lambda: self.client.infer(spec.name, inputs, outputs=outputs, client_timeout=self.timeout,
                                      parameters=parameters or None),
            self.retry_for,
        )
        warn_if_truncated([text.decode() for text in result.as_numpy(truncated.name)])
        return result.as_numpy(images.name)
