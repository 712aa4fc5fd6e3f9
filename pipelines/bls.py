"""Client of the server-side BLS pipeline (triton/models/pipeline_text_to_image).

One gRPC request carries the prompts and settings; the whole loop runs inside Triton, where
the networks are called as BLS sub-requests with tensors passed by DLPack.
"""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

from pipelines.client import DEFAULT_RETRY_FOR, DEFAULT_URL, call_with_retries, check_server, connect, infer_inputs
from pipelines.request import GenerationRequest, check_request, request_to_arrays
from utils import specs


class BlsPipeline:
    spec = specs.TEXT_TO_IMAGE

    def __init__(self, url: str = DEFAULT_URL, timeout: float | None = 600.0,
                 retry_for: float = DEFAULT_RETRY_FOR):
        self.client = connect(url)
        check_server(self.client, url)
        self.timeout = timeout  # per request; the server stops working on it when it expires
        self.retry_for = retry_for  # how long to keep retrying retryable failures (0: never)

    def __call__(self, prompt: str | list[str], **options) -> np.ndarray:
        """Return uint8 images [N, H, W, 3]. ``options``: the other GenerationRequest fields
        (negative_prompt, guidance_scale, num_inference_steps, seed)."""
        # The shared checks first, as the client-side pipeline does: a bad value gets the server's
        # message without a round trip (the server checks again, and knows the step cap).
        request = check_request(GenerationRequest(prompt=prompt, **options), max_prompts=self.spec.max_prompts(),
                                max_steps=None)
        return self.infer(request_to_arrays(request))

    def infer(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Send these input tensors as they are (the server validates them)."""
        inputs = infer_inputs(arrays)
        (output,) = self.spec.outputs
        outputs = [grpcclient.InferRequestedOutput(output.name)]
        result = call_with_retries(
            lambda: self.client.infer(self.spec.name, inputs, outputs=outputs, client_timeout=self.timeout),
            self.retry_for,
        )
        return result.as_numpy(output.name)
