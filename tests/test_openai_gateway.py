"""The OpenAI-compatible images API: the official openai SDK generates, edits and streams images
through the gateway (started by its launcher, as the walkthrough starts it) in front of the
session's Triton server, each image equal to the BLS pipeline's for the same request; bad requests
get OpenAI's errors, and none of them reaches Triton."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import report
from PIL import Image

from pipelines.bls import BlsPipeline
from pipelines.openai_gateway import check_key
from pipelines.openai_images import OpenAIError, Served, edit_inputs, from_png_base64, generation, png
from utils import specs
from utils.gateway import DEFAULT_SERVED_MODEL
from utils.grpc_client import connect
from utils.layout import PROJECT_ROOT
from utils.server.process import free_port

SERVED = Served("tiny", specs.ImageSizes(48, 96, 8), (64, 64))


def picture(size=(64, 64), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


# Fast: the translation alone.

@pytest.mark.parametrize("body, status, param, message", [
    ({"prompt": "a", "size": "100x100"}, 400, "size", "size='100x100' is not served: each side a multiple of 8"),
    ({"prompt": "a", "size": "big"}, 400, "size", "is not a size"),
    ({"prompt": "a", "n": 99}, 400, "n", "n=99 is not allowed: at most"),
    ({"prompt": "a", "response_format": "url"}, 400, "response_format", "b64_json only"),
    ({"prompt": "a", "model": "dall-e-3"}, 404, "model", "does not exist"),
    ({"prompt": ""}, 400, "prompt", "prompt is required"),
    ({"prompt": "a", "quality": "ultra"}, 400, "quality", "quality='ultra' is not allowed"),
    ({"prompt": "a", "partial_images": 9}, 400, "partial_images", "use 0 to 3"),
    ({"prompt": "a", "guidance_scale": "x"}, 400, "guidance_scale", "is not a float"),
    ({"prompt": "a", "num_inference_steps": 0}, 400, "num_inference_steps", "num_inference_steps=0 is not allowed"),
    ({"prompt": "a", "colour": "red"}, 400, "colour", "Unrecognized request argument supplied: colour"),
])
def test_a_bad_request_is_refused_in_openais_format(body, status, param, message):
    with pytest.raises(OpenAIError, match=message) as refused:
        generation(body, SERVED)
    error = refused.value
    assert (error.status, error.param) == (status, param)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.slow  # (the session repository: the exports)
def test_the_served_sizes_are_the_repositorys(repository, tiny_model):
    from pipelines.openai_gateway import served_by

    served = served_by(repository, "sd")
    dims = specs.ModelDims.from_pretrained(tiny_model)
    assert served.sizes == specs.ImageSizes.default(dims) and served.default_size == (64, 64)
    with pytest.raises(ValueError, match="has no pipeline_text_to_image model"):
        served_by(repository / "missing", "sd")


def test_a_request_becomes_the_pipelines_request():
    made = generation({"prompt": "a red door", "n": 2, "size": "80x48", "quality": "low", "seed": 3,
                       "negative_prompt": "blurry", "clip_skip": 1, "model": "tiny"}, SERVED)
    request = made.request
    assert (request.prompt, request.num_images_per_prompt, request.height, request.width) == (["a red door"], 2, 48, 80)
    assert (request.num_inference_steps, request.seed, request.negative_prompt, request.clip_skip) == (20, 3,
                                                                                                      ["blurry"], 1)
    assert made.size == "80x48" and not made.stream
    assert generation({"prompt": "a"}, SERVED).request.height == 64  # the checkpoint's own size


def test_openais_mask_repaints_where_it_is_transparent():
    image = np.dstack([picture(), np.full((64, 64), 255, np.uint8)])
    mask = np.zeros((64, 64, 4), np.uint8) + 255
    mask[:32, :, 3] = 0  # the top half transparent: repaint it
    rgb, mask_image = edit_inputs(image, mask)
    assert rgb.shape == (1, 64, 64, 3) and mask_image.shape == (1, 64, 64)
    assert (mask_image[0, :32] == 255).all() and (mask_image[0, 32:] == 0).all()
    opaque = np.zeros((64, 64, 4), np.uint8) + 255
    opaque[:, :16, :3] = 0  # no transparency: white repaints, as diffusers' masks
    assert (edit_inputs(image, opaque)[1][0, :, 16:] == 255).all() and (edit_inputs(image, opaque)[1][0, :, :16] == 0).all()


def test_the_key_is_required_and_compared():
    for header, code in ((None, None), ("Bearer wrong", "invalid_api_key"), ("Basic secret", None)):
        with pytest.raises(OpenAIError) as refused:
            check_key(header, "secret")
        assert refused.value.status == 401 and refused.value.code == code
    check_key("Bearer secret", "secret")


# Server: the gateway started by its launcher, the SDK as its client.

@pytest.fixture(scope="module")
def gateway(triton_server, repository):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "scripts/launch_openai_gateway.py"), "--url", triton_server.grpc_url,
         "--port", str(port), "--repository", str(repository)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        key = None
        for line in process.stdout:
            if line.startswith("API key"):
                key = line.split(": ", 1)[1].split()[0]
            if line.startswith("OpenAI images API"):
                break
        url = f"http://127.0.0.1:{port}"
        _wait_until_ready(url)
        yield url, key
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_until_ready(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if _http("GET", f"{url}/health/ready")[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the gateway at {url} did not get ready")


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """A plain HTTP call (no SDK): the status and the body, an error's included."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def sdk(gateway):
    from openai import OpenAI

    url, key = gateway
    return OpenAI(base_url=f"{url}/v1", api_key=key)


@pytest.mark.server
def test_the_sdk_generates_the_bls_pipelines_image(sdk, triton_server):
    response = sdk.images.generate(model=DEFAULT_SERVED_MODEL, prompt="a red door", n=2, size="80x48", response_format="b64_json",
                                   extra_body={"seed": 3, "num_inference_steps": 4})
    images = np.stack([from_png_base64(image.b64_json) for image in response.data])
    expected = BlsPipeline(triton_server.grpc_url)(prompt="a red door", num_images_per_prompt=2, height=48, width=80,
                                                    seed=3, num_inference_steps=4)
    report(f"OpenAI gateway: images.generate, 2 images, equal to the BLS pipeline's: "
           f"max pixel difference {int(np.abs(images.astype(int) - expected.astype(int)).max())}")
    assert images.shape == (2, 48, 80, 3) and np.array_equal(images, expected)
    assert [model.id for model in sdk.models.list()] == [DEFAULT_SERVED_MODEL]


@pytest.mark.server
def test_the_sdk_edits_an_image_with_openais_mask(sdk, triton_server):
    image = picture(seed=1)
    mask = np.dstack([np.zeros((64, 64, 3), np.uint8), np.full((64, 64), 255, np.uint8)])
    mask[16:48, 16:48, 3] = 0  # repaint the middle
    response = sdk.images.edit(image=("photo.png", png(image), "image/png"), mask=("mask.png", png(mask), "image/png"),
                               prompt="a blue window", response_format="b64_json",
                               extra_body={"seed": 5, "num_inference_steps": 4})
    edited = from_png_base64(response.data[0].b64_json)
    repaint = np.zeros((1, 64, 64), np.uint8)
    repaint[0, 16:48, 16:48] = 255
    expected = BlsPipeline(triton_server.grpc_url)(prompt="a blue window", image=image[None], mask_image=repaint,
                                                    seed=5, num_inference_steps=4)[0]
    assert edited.shape == (64, 64, 3) and np.array_equal(edited, expected)
    plain = sdk.images.edit(image=("photo.png", png(image), "image/png"), prompt="a blue window",
                            extra_body={"seed": 5, "num_inference_steps": 4, "strength": 0.5})  # image to image
    assert from_png_base64(plain.data[0].b64_json).shape == (64, 64, 3)


@pytest.mark.server
def test_the_sdk_streams_partial_images_then_the_image(sdk, triton_server):
    events = list(sdk.images.generate(prompt="a small boat", stream=True, partial_images=2, size="64x64",
                                      extra_body={"seed": 2, "num_inference_steps": 6}))
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    final = from_png_base64(events[-1].b64_json)
    expected = BlsPipeline(triton_server.grpc_url)(prompt="a small boat", seed=2, num_inference_steps=6)[0]
    assert np.array_equal(final, expected)


@pytest.mark.server
def test_bad_requests_get_openais_errors_and_never_reach_triton(gateway, sdk, triton_server):
    import http.client
    import json

    import openai

    url, key = gateway
    client = connect(triton_server.grpc_url)
    headers = triton_server.admin_headers()

    def served() -> int:
        """The pipelines' requests so far, once the count is settled (the last test's may still land)."""

        def count() -> int:
            return sum(int(client.get_inference_statistics(name, headers=headers, as_json=True)["model_stats"][0]
                           ["inference_stats"]["success"].get("count", 0))
                       for name in (specs.TEXT_TO_IMAGE.name, specs.IMAGE_TO_IMAGE.name))

        last = count()
        while True:
            time.sleep(0.5)
            now = count()
            if now == last:
                return now
            last = now

    before = served()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").images.generate(prompt="a")
    status, body = _http("POST", f"{url}/v1/images/generations", b'{"prompt": "a"}',
                         {"Content-Type": "application/json"})  # no key
    assert status == 401 and "didn't provide an API key" in json.loads(body)["error"]["message"]
    for options, param in (({"size": "100x100"}, "size"), ({"n": 99}, "n")):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.images.generate(prompt="a", **options)
        assert refused.value.body["param"] == param
    with pytest.raises(openai.BadRequestError, match="image is not an image"):
        sdk.images.edit(image=("photo.png", b"not a picture", "image/png"), prompt="a")
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)  # 17 MiB declared, none sent
    connection.putrequest("POST", "/v1/images/generations")
    for header, value in (("Authorization", f"Bearer {key}"), ("Content-Length", str(17 * 2**20))):
        connection.putheader(header, value)
    connection.endheaders()
    huge = connection.getresponse()
    assert huge.status == 413 and "larger than" in json.loads(huge.read())["error"]["message"]
    connection.close()
    assert served() == before
    metrics = _http("GET", f"{url}/metrics")[1].decode()
    assert 'sd_gateway_requests_total{endpoint="/v1/images/generations",status="400"}' in metrics


@pytest.mark.server
def test_the_documents_examples_run_as_written(gateway, tmp_path):
    """The curl and SDK examples of docs/openai-api.md and the README, on the test gateway's port."""
    import contextlib
    import os

    from utils.gateway import API_KEY_ENV, DEFAULT_PORT
    from utils.docs.facts import OPENAI_CURL_EXAMPLE, OPENAI_SDK_EXAMPLE

    url, key = gateway
    here = url.removeprefix("http://")
    environment = {**os.environ, API_KEY_ENV: key,
                   "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}  # its python
    start = time.monotonic()
    subprocess.run(["bash", "-c", OPENAI_CURL_EXAMPLE.replace(f"127.0.0.1:{DEFAULT_PORT}", here)], cwd=tmp_path,
                   env=environment, check=True, timeout=120)
    report(f"OpenAI gateway: the README's curl example wrote 2 images in {time.monotonic() - start:.1f} s")
    foxes = sorted(tmp_path.glob("fox-*.png"))
    assert [path.name for path in foxes] == ["fox-0.png", "fox-1.png"]
    assert all(Image.open(path).size == (64, 64) for path in foxes)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(OPENAI_SDK_EXAMPLE.replace(f"127.0.0.1:{DEFAULT_PORT}", here).replace('"KEY"', repr(key)), {})
    assert printed.getvalue().strip() == OPENAI_SDK_EXAMPLE.rsplit("# ", 1)[1]
