"""Bad requests to the BLS pipeline get a clear INVALID_ARG error, and the server keeps serving."""

from __future__ import annotations

import re

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from utils import specs
from utils.request import GenerationRequest, request_to_arrays

pytestmark = pytest.mark.server  # starts tritonserver

GOOD = dict(prompt="a cat", num_inference_steps=2, seed=1)
MAX_PROMPTS = specs.TEXT_TO_IMAGE.max_prompts()


def arrays(**overrides):
    values = request_to_arrays(GenerationRequest(**GOOD))
    for name, value in overrides.items():
        if value is None:
            values.pop(name)
        else:
            values[name] = value
    return values


BAD_REQUESTS = {
    "missing prompt": (arrays(prompt=None), r"prompt is required"),
    "invalid UTF-8": (arrays(prompt=np.array([b"caf\xe9"], dtype=object)), r"prompt\[0\] is not valid UTF-8 .*0xe9"),
    "invalid UTF-8 negative": (arrays(negative_prompt=np.array([b"\xff"], dtype=object)),
                               r"negative_prompt\[0\] is not valid UTF-8"),
    "zero steps": (arrays(num_inference_steps=np.array([0], np.int32)), r"num_inference_steps=0 .* \[1, 999\]"),
    "steps past the schedule": (arrays(num_inference_steps=np.array([1000], np.int32)),
                                r"num_inference_steps=1000 .* \[1, 999\]"),
    "too many steps": (arrays(num_inference_steps=np.array([100000], np.int32)),
                       r"num_inference_steps=100000 .* \[1, 999\]"),
    "few-step scheduler past its schedule": (
        arrays(scheduler=np.array([b"LCMScheduler"], dtype=object), num_inference_steps=np.array([60], np.int32)),
        r"num_inference_steps=60 is not allowed with LCMScheduler: use at most 50"),
    "guidance cut-off past the end": (arrays(cfg_cutoff_step_ratio=np.array([1.5], np.float32)),
                                      r"cfg_cutoff_step_ratio=1.5 is not allowed: use a fraction of the steps in \[0, 1\]"),
    "NaN guidance": (arrays(guidance_scale=np.array([np.nan], np.float32)), r"guidance_scale=nan .*finite"),
    "infinite guidance": (arrays(guidance_scale=np.array([np.inf], np.float32)), r"guidance_scale=inf .*finite"),
    "negative seed": (arrays(seed=np.array([-1], np.int64)), r"seed=-1 .*\[0, 2\*\*63 - 1\]"),
    "too many prompts": (arrays(prompt=np.array([b"a"] * (MAX_PROMPTS + 1), dtype=object)),
                         rf"prompt has {MAX_PROMPTS + 1} entries: at most {MAX_PROMPTS}"),
    "prompt too long": (arrays(prompt=np.array([b"x" * 5000], dtype=object)), r"prompt\[0\] has 5000 bytes"),
    # Triton checks the declared dims [1] itself, with a message that names the input.
    "two guidance values": (arrays(guidance_scale=np.array([1.0, 2.0], np.float32)),
                            r"input 'guidance_scale' .* Expected \[1\], got \[2\]"),
    "unknown scheduler": (arrays(scheduler=np.array([b"__import__('os')"], dtype=object)),
                          r"scheduler=\"__import__\('os'\)\" is not allowed: use one of PNDMScheduler, DDIMScheduler"),
    "zero images per prompt": (arrays(num_images_per_prompt=np.array([0], np.int32)),
                               r"num_images_per_prompt=0 is not allowed: use an integer of at least 1"),
    "more images than the profiles": (arrays(num_images_per_prompt=np.array([MAX_PROMPTS + 1], np.int32)),
                                      rf"1 prompt\(s\) x num_images_per_prompt={MAX_PROMPTS + 1} make "
                                      rf"{MAX_PROMPTS + 1} images: at most {MAX_PROMPTS}"),
    "height off the step": (arrays(height=np.array([60], np.int32)),
                            r"height=60 is not served: use a multiple of 8 in \[48, 96\] pixels.*--image-sizes"),
    "width past the range": (arrays(width=np.array([104], np.int32)),
                             r"width=104 is not served: use a multiple of 8 in \[48, 96\] pixels"),
    "mismatched negative prompts": (
        arrays(prompt=np.array([b"a", b"b"], dtype=object), negative_prompt=np.array([b"x"] * 3, dtype=object)),
        r"negative_prompt has 3 entries but prompt has 2",
    ),
}


@pytest.fixture(scope="module")
def bls(triton_server):
    return BlsPipeline(triton_server.grpc_url)


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_rejected_clearly_and_server_keeps_serving(case, bls):
    values, message = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as caught:
        bls.infer(values)
    error = caught.value
    assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    text = error.message()
    assert re.search(message, text), text
    assert "Traceback" not in text and "/" not in text, f"internals leaked: {text}"
    images = bls(**GOOD)  # the next good request succeeds
    assert images.shape[0] == 1 and images.std() > 0



def test_bad_requests_among_good_ones_fail_alone(bls):
    """Concurrent good and bad requests: each bad one gets its own error, every good one its image."""
    from concurrent.futures import ThreadPoolExecutor

    bad_values, _ = BAD_REQUESTS["NaN guidance"]

    def send(index):
        try:
            return "image", bls.infer(bad_values if index % 2 else arrays()).shape
        except InferenceServerException as error:
            return error.status(), None

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(send, range(12)))
    assert outcomes[0::2] == [("image", (1, 64, 64, 3))] * 6
    assert outcomes[1::2] == [("StatusCode.INVALID_ARGUMENT", None)] * 6


def test_bls_client_refuses_what_the_server_would_with_the_same_message(bls):
    from utils.request import InvalidRequest

    with pytest.raises(InvalidRequest, match=r"seed=9223372036854775808 is not allowed: use an integer in \[0, 2\*\*63 - 1\]"):
        bls("a cat", seed=2**63)  # was a bare OverflowError while packing the request
    with pytest.raises(InvalidRequest, match=r"num_inference_steps=0 is not allowed"):
        bls("a cat", num_inference_steps=0)


# What a client sees over HTTP/REST when the JSON itself is malformed: Triton's own frontend
# answers, before any model runs (status, message), and docs/reliability.md's table says so.
HTTP_FRONTEND = {
    "shape [-1]": ('{"inputs":[{"name":"prompt","shape":[-1],"datatype":"BYTES","data":["a"]}]}', 500,
                   "Unable to parse 'shape': attempt to access JSON non-unsigned-integer as unsigned-integer"),
    "seed 2^63": ('{"inputs":[{"name":"prompt","shape":[1],"datatype":"BYTES","data":["a"]},'
                  '{"name":"seed","shape":[1],"datatype":"INT64","data":[9223372036854775808]}]}', 500,
                  "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer"),
    "prompt as a number": ('{"inputs":[{"name":"prompt","shape":[1],"datatype":"BYTES","data":[5]}]}', 500,
                           "Unable to parse JSON bytes array: attempt to access JSON non-string as string"),
    "truncated JSON": ('{"inputs":[{"name":"prompt",', 500,
                       "failed to parse the request JSON buffer: Missing a name for object member. at 28"),
    # INT32 2^31 wraps to -2^31 in the frontend; the pipeline's own check then names it.
    "steps 2^31": ('{"inputs":[{"name":"prompt","shape":[1],"datatype":"BYTES","data":["a"]},'
                   '{"name":"num_inference_steps","shape":[1],"datatype":"INT32","data":[2147483648]}]}', 400,
                   "num_inference_steps=-2147483648 is not allowed: use an integer in [1, 999]."),
}


@pytest.mark.parametrize("case", HTTP_FRONTEND)
def test_what_an_http_client_sees_for_malformed_json(case, triton_server, bls):
    import json
    import urllib.error
    import urllib.request

    body, status, message = HTTP_FRONTEND[case]
    request = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/{specs.TEXT_TO_IMAGE.name}/infer",
                                     data=body.encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == status and json.loads(caught.value.read()) == {"error": message}
    assert bls(**GOOD).shape[0] == 1  # and the server keeps serving


def test_grpc_checks_a_declared_shape_before_allocating_it(triton_server):
    """Over gRPC a request that declares a billion floats with 4 bytes of data is refused by its
    shape, naming the input, with nothing allocated (HTTP allocates first: its frontend is off by
    default in this project's launcher)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from utils.server import resident_bytes

    request = service_pb2.ModelInferRequest(model_name=specs.TEXT_TO_IMAGE.name)
    declared = request.inputs.add(name="guidance_scale", datatype="FP32")
    declared.shape.extend([10**9])
    request.raw_input_contents.append(np.float32([7.5]).tobytes())
    before = resident_bytes(triton_server.process.pid)
    with grpc.insecure_channel(triton_server.grpc_url) as channel, pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unexpected shape for input 'guidance_scale'" in caught.value.details()
    assert resident_bytes(triton_server.process.pid) - before < 50 * 2**20


IMAGE = np.full((1, 64, 64, 3), 100, np.uint8)  # the tiny model's size
ENSEMBLE_BAD_REQUESTS = {
    # Not Triton's "unexpected deadlock": the ensemble's first step names what is missing.
    "missing prompt": (specs.ENSEMBLE_TEXT_TO_IMAGE, arrays(prompt=None),
                       r"in ensemble 'ensemble_text_to_image', prompt is required"),
    "missing image": (specs.ENSEMBLE_IMAGE_TO_IMAGE, arrays(),
                      r"in ensemble 'ensemble_image_to_image', image is required: send a UINT8 tensor of shape "
                      r"\[-1, -1, -1, 3\]"),
    "image of a size not served": (specs.ENSEMBLE_IMAGE_TO_IMAGE, arrays(image=np.zeros((1, 32, 64, 3), np.uint8)),
                                   r"image is 32x64 pixels \(height x width\): its height and width must each be "
                                   r"a multiple of 8 in \[48, 96\]"),
    "unknown scheduler": (specs.ENSEMBLE_TEXT_TO_IMAGE, arrays(scheduler=np.array([b"Flux"], dtype=object)),
                          r"scheduler='Flux' is not allowed"),
    "height off the step": (specs.ENSEMBLE_TEXT_TO_IMAGE, arrays(height=np.array([50], np.int32)),
                            r"height=50 is not served: use a multiple of 8 in \[48, 96\]"),
    "image with four channels": (specs.ENSEMBLE_IMAGE_TO_IMAGE, arrays(image=np.zeros((1, 64, 64, 4), np.uint8)),
                                 r"unexpected shape for input 'image' .* Expected \[-1,-1,-1,3\], got \[1,64,64,4\]"),
    "image as floats": (specs.ENSEMBLE_IMAGE_TO_IMAGE, arrays(image=np.zeros((1, 64, 64, 3), np.float32)),
                        r"inference input 'image' data-type is 'FP32', but model 'ensemble_image_to_image' "
                        r"expects 'UINT8'"),
    "zero strength": (specs.ENSEMBLE_IMAGE_TO_IMAGE, arrays(image=IMAGE, strength=np.array([0.0], np.float32)),
                      r"strength=0.0 is not allowed: use a number in \(0, 1\]"),
    "NaN guidance": (specs.ENSEMBLE_TEXT_TO_IMAGE, arrays(guidance_scale=np.array([np.nan], np.float32)),
                     r"guidance_scale=nan .*finite"),
    "zero steps": (specs.ENSEMBLE_TEXT_TO_IMAGE, arrays(num_inference_steps=np.array([0], np.int32)),
                   r"num_inference_steps=0 .* \[1, 999\]"),
    "more images than prompts": (specs.ENSEMBLE_IMAGE_TO_IMAGE, arrays(image=np.zeros((3, 64, 64, 3), np.uint8)),
                                 r"image has shape \[3, 64, 64, 3\]: send \[N, H, W, 3\] "
                                 r"\(N = 1 or one per prompt: 1\)"),
}


@pytest.fixture(scope="module")
def ensemble(triton_server):
    from pipelines.ensemble import EnsemblePipeline

    return EnsemblePipeline(triton_server.grpc_url)


@pytest.mark.parametrize("case", ENSEMBLE_BAD_REQUESTS)
def test_bad_request_through_an_ensemble_is_named_and_the_server_keeps_serving(case, ensemble):
    spec, values, message = ENSEMBLE_BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as caught:
        ensemble.infer(values, spec)
    text = caught.value.message()
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", text
    assert re.search(message, text), text
    assert "deadlock" not in text and "Traceback" not in text
    assert ensemble("a cat", num_inference_steps=2, seed=1).shape == (1, 64, 64, 3)
    assert ensemble("a cat", image=IMAGE, num_inference_steps=2, seed=1).shape == (1, 64, 64, 3)
