"""The pipeline's own metrics (utils/metrics.py) on Triton's metrics port, next to Triton's."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from pipelines.ensemble import EnsemblePipeline
from utils import metrics

pytestmark = pytest.mark.server  # starts tritonserver


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """Every sample on the server's metrics port: (name, labels) -> value."""
    return metrics.scrape(server.metrics_url)


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_images_steps_and_unet_latency_are_counted_per_model(triton_server):
    before = scrape(triton_server)
    images = BlsPipeline(triton_server.grpc_url)(["a red cube", "a blue sphere"], num_images_per_prompt=2,
                                                 num_inference_steps=3, seed=1, scheduler="DDIMScheduler")
    EnsemblePipeline(triton_server.grpc_url)("a cat", num_inference_steps=2, seed=1, scheduler="DDIMScheduler")
    after = scrape(triton_server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert len(images) == 4 and grew(metrics.IMAGES.name, model="pipeline_text_to_image") == 4
    assert grew(metrics.STEPS.name, model="pipeline_text_to_image") == 3  # both prompts' rows in one UNet call
    # The ensemble's images are counted where they are made (its postprocess step), its steps in denoise.
    assert grew(metrics.IMAGES.name, model="postprocess") == 1
    assert grew(metrics.STEPS.name, model="denoise") == 2
    histogram = metrics.UNET_STEP_SECONDS.name
    assert grew(f"{histogram}_count", model="pipeline_text_to_image") == 3
    assert grew(f"{histogram}_sum", model="pipeline_text_to_image") > 0
    assert grew(f"{histogram}_bucket", model="pipeline_text_to_image", le="+Inf") == 3
    # Triton's own count of the pipeline model: requests, not images (it does not batch).
    assert grew("nv_inference_count", model="pipeline_text_to_image", version="1") == 1


def test_refused_requests_are_counted_by_the_input_they_got_wrong(triton_server):
    before = scrape(triton_server)
    bls = BlsPipeline(triton_server.grpc_url)
    for bad in (dict(prompt="a cat", num_inference_steps=np.int32(0)), dict(prompt="a cat", height=50)):
        arrays = {name: array for name, array in _arrays(**bad).items()}
        with pytest.raises(InferenceServerException, match="is not"):
            bls.infer(arrays)
    after = scrape(triton_server)
    for name in ("num_inference_steps", "height"):
        labels = dict(model="pipeline_text_to_image", input=name)
        assert value(after, metrics.REJECTED.name, **labels) - value(before, metrics.REJECTED.name, **labels) == 1


def _arrays(**options):
    from utils.request import GenerationRequest, request_to_arrays

    return request_to_arrays(GenerationRequest(**options))
