"""Bad requests to the BLS pipeline get a clear INVALID_ARG error, and the server keeps serving."""

from __future__ import annotations

import re

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from pipelines.request import GenerationRequest, request_to_arrays
from utils import specs

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
    "NaN guidance": (arrays(guidance_scale=np.array([np.nan], np.float32)), r"guidance_scale=nan .*finite"),
    "infinite guidance": (arrays(guidance_scale=np.array([np.inf], np.float32)), r"guidance_scale=inf .*finite"),
    "negative seed": (arrays(seed=np.array([-1], np.int64)), r"seed=-1 .*\[0, 2\*\*63 - 1\]"),
    "too many prompts": (arrays(prompt=np.array([b"a"] * (MAX_PROMPTS + 1), dtype=object)),
                         rf"prompt has {MAX_PROMPTS + 1} entries: at most {MAX_PROMPTS}"),
    "prompt too long": (arrays(prompt=np.array([b"x" * 5000], dtype=object)), r"prompt\[0\] has 5000 bytes"),
    # Triton checks the declared dims [1] itself, with a message that names the input.
    "two guidance values": (arrays(guidance_scale=np.array([1.0, 2.0], np.float32)),
                            r"input 'guidance_scale' .* Expected \[1\], got \[2\]"),
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
