"""Inpainting served, in the three ways, equal to diffusers' StableDiffusionInpaintPipeline: with
the session's plain UNet (the loop blends) and with a server of an inpainting checkpoint (9-channel
UNet); bad masks refused by name while the server keeps serving."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import report
from test_inpainting import diffusers_inpaint, photo_and_mask
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from pipelines.client_side import ClientSidePipeline
from pipelines.ensemble import EnsemblePipeline
from utils import specs
from utils.deployment import Deployment
from utils.export import export_network, onnx_path
from utils.repository.writer import write_repository
from utils.server import TritonServer

pytestmark = pytest.mark.server  # starts tritonserver

MAX_PIXEL_DIFFERENCE = 2
CASES = {
    "strength 1": dict(prompt="a red door", seed=5, num_inference_steps=8),
    # 0.7 arrives as FP32 0.699999988: 10 steps keep 7 all the same, as diffusers.
    "strength 0.7, 2 images per prompt": dict(prompt="a blue window", seed=9, num_inference_steps=10, strength=0.7,
                                              num_images_per_prompt=2, guidance_scale=5.0),
}


def three_ways(url: str, model_dir) -> dict:
    client_side = ClientSidePipeline(model_dir, url)
    return {"client-side": lambda **options: client_side(progress=False, **options), "BLS": BlsPipeline(url),
            "ensemble": EnsemblePipeline(url)}


@pytest.fixture(scope="module")
def plain_ways(triton_server, tiny_model):
    return three_ways(triton_server.grpc_url, tiny_model)


@pytest.fixture(scope="module")
def inpainting_server(tiny_inpaint, tmp_path_factory):
    """A server of the inpainting checkpoint: its four networks exported, the default repository."""
    onnx_dir, repository = tmp_path_factory.mktemp("onnx-inpaint"), tmp_path_factory.mktemp("repository-inpaint")
    exported = {name: export_network(network, tiny_inpaint, onnx_path(onnx_dir, "tiny-inpaint", name)).path
                for name, network in specs.NETWORKS.items()}
    write_repository(repository, tiny_inpaint, exported, Deployment())
    with TritonServer(repository) as server:
        yield server


@pytest.fixture(scope="module")
def inpainting_ways(inpainting_server, tiny_inpaint):
    return three_ways(inpainting_server.grpc_url, tiny_inpaint)


UNETS = {  # each kind of checkpoint: the fixtures of its three ways and of its diffusers folder
    "plain UNet": ("plain_ways", "tiny_model"),
    "inpainting UNet": ("inpainting_ways", "tiny_inpaint"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["client-side", "BLS", "ensemble"])
@pytest.mark.parametrize("unet", UNETS)
def test_inpainting_equals_diffusers(unet, kind, case, request):
    ways, model_dir = (request.getfixturevalue(name) for name in UNETS[unet])
    photo, mask = photo_and_mask()
    served = ways[kind](image=photo, mask_image=mask, **CASES[case])
    expected = diffusers_inpaint(model_dir, photo, mask, **CASES[case])
    difference = int(np.abs(served.astype(int) - expected.astype(int)).max())
    report(f"{kind:<12} inpaint ({unet}) vs diffusers, {case}: max pixel difference {difference} "
           f"(allowed {MAX_PIXEL_DIFFERENCE})")
    assert served.shape == expected.shape and difference <= MAX_PIXEL_DIFFERENCE


def test_an_inpainting_deployment_serves_what_inpaints_and_refuses_the_rest_with_the_reason(inpainting_server):
    from utils.grpc_client import connect, infer_inputs
    from utils.server.health import canary, served_pipelines

    repository = inpainting_server.model_repository
    served = {spec.name for spec in served_pipelines(repository)}
    assert served == {specs.IMAGE_TO_IMAGE.name, specs.IMAGE_TO_IMAGE_STREAM.name, specs.ENSEMBLE_INPAINT.name}
    canary(inpainting_server.grpc_url, pipelines=served_pipelines(repository))  # the supervisor's: masks included
    photo, _ = photo_and_mask()
    client = connect(inpainting_server.grpc_url)
    with pytest.raises(InferenceServerException, match="mask_image is required: this deployment serves an inpainting"):
        client.infer(specs.IMAGE_TO_IMAGE.name, infer_inputs({specs.PROMPT.name: np.array([b"a cat"], dtype=object),
                                                              specs.INIT_IMAGE.name: photo}))


BAD = {  # what is sent besides the prompt and the photo: the message
    "a mask of another size": (dict(mask_image=np.full((1, 64, 32), 255, np.uint8)), "mask_image has shape"),
    "an all-black mask": (dict(mask_image=np.zeros((1, 64, 64), np.uint8)), "is black everywhere: nothing to repaint"),
    "an all-white mask": (dict(mask_image=np.full((1, 64, 64), 255, np.uint8)), "is white everywhere"),
}


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("model", [specs.IMAGE_TO_IMAGE, specs.ENSEMBLE_INPAINT])
def test_a_bad_mask_is_refused_by_name_and_the_server_keeps_serving(case, model, triton_server):
    from utils.grpc_client import connect, infer_inputs

    extra, message = BAD[case]
    photo, mask = photo_and_mask()
    client = connect(triton_server.grpc_url)
    inputs = {specs.PROMPT.name: np.array([b"a cat"], dtype=object), specs.INIT_IMAGE.name: photo,
              specs.NUM_INFERENCE_STEPS.name: np.array([2], np.int32)}
    with pytest.raises(InferenceServerException, match=message) as refused:
        client.infer(model.name, infer_inputs({**inputs, **extra}))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    served = client.infer(model.name, infer_inputs({**inputs, specs.MASK_IMAGE.name: mask}))
    assert served.as_numpy(specs.IMAGES.name).shape == (1, 64, 64, 3)


def test_the_ensemble_refuses_an_inpainting_request_without_its_mask(triton_server):
    photo, _ = photo_and_mask()
    with pytest.raises(InferenceServerException, match="mask_image is required"):
        EnsemblePipeline(triton_server.grpc_url).infer(
            {specs.PROMPT.name: np.array([b"a cat"], dtype=object), specs.INIT_IMAGE.name: photo},
            specs.ENSEMBLE_INPAINT)
