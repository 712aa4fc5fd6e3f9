"""Every served pipeline refuses an out-of-range value of every numeric input before any network
runs: INVALID_ARGUMENT naming the input, the value and what is allowed, in every way (the BLS
pipelines, the streams, and the ensembles, whose first step checks the whole request with the
same function)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from utils import specs
from utils.layout import network_of
from utils.grpc_client import infer_inputs
from utils.mask import box_mask
from utils.request import GenerationRequest, request_to_arrays
from utils.sdxl_ensembles import ENSEMBLE_TEXT_TO_IMAGE_REFINED
from utils.server.health import TOP_LEVEL, stream_once

pytestmark = pytest.mark.server  # uses the session's tritonserver

INT32_MAX = 2**31 - 1
IMAGE = np.full((1, 64, 64, 3), 128, np.uint8)
GOOD = dict(prompt="a cat", num_inference_steps=2, seed=1)
# What clients call: the BLS pipelines, the streams and the ensembles (ControlNet's where a server has
# ControlNets: tests/test_controlnet_served.py refuses its bad inputs; SDXL's base then refiner where
# an SDXL server has its refiner: tests/test_sdxl_served.py).
SERVED = tuple(spec for spec in TOP_LEVEL if spec not in (specs.ENSEMBLE_CONTROLNET, ENSEMBLE_TEXT_TO_IMAGE_REFINED))
# What each numeric input allows, by the request's contract: values the sweep does not send.
ALLOWED = {specs.GUIDANCE_SCALE.name: {0.0}, specs.CFG_CUTOFF_STEP_RATIO.name: {0.0}, specs.SEED.name: {0, INT32_MAX},
           specs.PREVIEW_EVERY.name: {0, INT32_MAX}, specs.CLIP_SKIP.name: {0}}
SWEEP = {"INT32": (0, -1, INT32_MAX), "INT64": (0, -1, INT32_MAX), "FP32": (0.0, -1.0, math.nan, float(INT32_MAX))}


def good_arrays(spec) -> dict[str, np.ndarray]:
    image_to_image = any(t.name == specs.INIT_IMAGE.name for t in spec.inputs)
    mask = {"mask_image": box_mask(*IMAGE.shape[1:3])} if spec is specs.ENSEMBLE_INPAINT else {}  # which needs one
    request = GenerationRequest(**GOOD, **({"image": IMAGE} if image_to_image else {}), **mask)
    arrays = request_to_arrays(request, specs.IMAGE_TO_IMAGE if image_to_image else specs.TEXT_TO_IMAGE)
    return {name: value for name, value in arrays.items() if name in {t.name for t in spec.inputs}}


def cases():
    for spec in SERVED:
        for tensor in spec.inputs:
            if tensor in specs.SDXL_INPUTS:  # an SD1.5 server refuses them whatever their value (below)
                continue
            for value in SWEEP.get(tensor.dtype, ()):
                if value in ALLOWED.get(tensor.name, ()):
                    continue
                yield pytest.param(spec, tensor, value, id=f"{spec.name}-{tensor.name}={value}")


def send(url: str, spec, arrays: dict[str, np.ndarray]) -> None:
    """One request as any client sends it (a stream for the decoupled models); raises its error."""
    client = grpcclient.InferenceServerClient(url)
    if spec.decoupled:
        stream_once(client, spec.name, arrays, timeout=60)
    else:
        client.infer(spec.name, infer_inputs(arrays), client_timeout=60)


def executions(server) -> dict[str, int]:
    """Each network's executions so far (Triton's statistics, behind the admin key)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    stats = client.get_inference_statistics("", headers=server.admin_headers(), as_json=True)["model_stats"]
    return {model["name"]: int(model.get("execution_count", 0)) for model in stats
            if network_of(model["name"]) in specs.NETWORKS}  # the adapters' UNets too


@pytest.fixture(scope="module")
def networks_before(triton_server):
    return executions(triton_server)


@pytest.mark.parametrize("spec, tensor, value", cases())
def test_an_out_of_range_value_is_refused_by_name_before_any_network(spec, tensor, value, triton_server,
                                                                     networks_before):
    arrays = good_arrays(spec) | {tensor.name: np.array([value], np.dtype(tensor.dtype.lower().replace("fp", "float")))}
    start = time.perf_counter()
    with pytest.raises(InferenceServerException) as caught:
        send(triton_server.grpc_url, spec, arrays)
    seconds = time.perf_counter() - start
    error = caught.value
    # A stream's error reaches the client as a message alone: Triton 2.51's gRPC stream response
    # carries no status code (the model answers INVALID_ARG all the same).
    expected = None if spec.decoupled else "StatusCode.INVALID_ARGUMENT"
    assert error.status() == expected, (error.status(), error.message())
    text = error.message()
    assert f"{tensor.name}=" in text and ("use " in text or "split" in text), text  # the input, its value, the fix
    assert "internal" not in text.lower() and "Traceback" not in text
    assert seconds < 5, f"refused after {seconds:.1f} s"
    assert executions(triton_server) == networks_before, "a network ran for a refused request"


SDXL_VALUES = {"BYTES": np.array([b"a dog"], np.object_), "INT32": np.array([64, 64], np.int32),
               "FP32": np.array([0.5], np.float32)}


@pytest.mark.parametrize("spec", SERVED, ids=lambda spec: spec.name)
def test_an_sd15_server_refuses_every_sdxl_input_by_name_before_any_network(spec, triton_server, networks_before):
    """Each SDXL input, well formed, sent to the session's SD1.5 deployment: refused by name, with the fix."""
    for tensor in specs.SDXL_INPUTS:
        with pytest.raises(InferenceServerException) as caught:
            send(triton_server.grpc_url, spec, good_arrays(spec) | {tensor.name: SDXL_VALUES[tensor.dtype]})
        text = caught.value.message()
        assert f"{tensor.name} is an SDXL input: this deployment serves an SD1.x checkpoint" in text, text
        assert "leave it out" in text
    assert executions(triton_server) == networks_before, "a network ran for a refused request"


def test_an_ensemble_refuses_more_images_than_the_profiles_at_once(triton_server, networks_before):
    """The whole request is checked before any network runs: no UNet step, no text encoder."""
    too_many = specs.MAX_PROMPTS + 1
    for spec in (specs.ENSEMBLE_TEXT_TO_IMAGE, specs.ENSEMBLE_IMAGE_TO_IMAGE, specs.ENSEMBLE_INPAINT):
        arrays = good_arrays(spec) | {specs.NUM_IMAGES_PER_PROMPT.name: np.array([too_many], np.int32)}
        start = time.perf_counter()
        with pytest.raises(InferenceServerException) as caught:
            send(triton_server.grpc_url, spec, arrays)
        seconds = time.perf_counter() - start
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value.message()
        assert (f"num_images_per_prompt={too_many} make {too_many} images: at most {specs.MAX_PROMPTS} per request"
                in caught.value.message())
        assert seconds < 1, f"{spec.name} refused after {seconds:.2f} s"
    assert executions(triton_server) == networks_before
