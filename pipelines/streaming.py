"""Client of the streaming pipelines (triton/models/pipeline_text_to_image_stream and
pipeline_image_to_image_stream); as with the other served pipelines, a request with an ``image``
is image to image.

Each model is decoupled: one request, many responses, over a gRPC stream. ``stream`` yields each
as a ``Progress``: the steps done, a preview every ``preview_every`` steps, and last the images.
Leaving the loop early (``break``, an exception, Ctrl+C) closes the stream, which cancels the
request on the server: its loop stops at the next step.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import tritonclient.grpc as grpcclient

from utils import specs
from utils.grpc_client import DEFAULT_URL, check_server, connect, infer_inputs
from utils.request import DEFAULT_PREVIEW_EVERY, GenerationRequest, check_before_sending, request_to_arrays


@dataclass(frozen=True)
class Progress:
    step: int  # denoising steps done
    total_steps: int
    images: np.ndarray  # uint8 [N, h, w, 3] previews (h = H/8), or the final images [N, H, W, 3]
    final: bool


class StreamingPipeline:
    text_to_image = specs.TEXT_TO_IMAGE_STREAM
    image_to_image = specs.IMAGE_TO_IMAGE_STREAM

    def __init__(self, url: str = DEFAULT_URL, timeout: float | None = 600.0):
        self.url = url
        check_server(connect(url), url)
        self.timeout = timeout  # the longest wait for the next response

    def stream(self, prompt: str | list[str] = (), preview_every: int = DEFAULT_PREVIEW_EVERY,
               **options) -> Iterator[Progress]:
        """Yield the request's progress, the final images last. ``options``: the other fields of
        GenerationRequest (``image`` and ``strength`` for image to image)."""
        request = check_before_sending(GenerationRequest(prompt=prompt, **options))
        spec = self.text_to_image if request.image is None else self.image_to_image
        arrays = request_to_arrays(request, spec) | {specs.PREVIEW_EVERY.name: np.array([preview_every], np.int32)}
        responses: queue.Queue = queue.Queue()
        client = connect(self.url)  # a stream of its own: one request per stream
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            client.async_stream_infer(spec.name, infer_inputs(arrays),
                                      outputs=[grpcclient.InferRequestedOutput(t.name) for t in spec.outputs])
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise TimeoutError(f"no response from {spec.name} in {self.timeout} s") from None
                if error is not None:
                    raise error
                progress = Progress(step=int(result.as_numpy(specs.STEP.name)[0]),
                                    total_steps=int(result.as_numpy(specs.TOTAL_STEPS.name)[0]),
                                    images=result.as_numpy(specs.IMAGES.name),
                                    final=bool(result.as_numpy(specs.FINAL.name)[0]))
                yield progress
                if progress.final:
                    return
        finally:  # done, or left early: closing the stream cancels what is still running
            client.stop_stream(cancel_requests=True)
            client.close()

    def __call__(self, prompt: str | list[str] = (), **options) -> np.ndarray:
        """The final images alone (uint8 [N, H, W, 3]), as the other served pipelines answer."""
        for progress in self.stream(prompt, preview_every=0, **options):
            if progress.final:
                return progress.images
        raise RuntimeError("the streaming pipeline closed its stream without a final response")
