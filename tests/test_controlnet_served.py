"""ControlNet served, in the three ways, equal to diffusers' StableDiffusionControlNetPipeline: a
server with two tiny ControlNets (each exported as controlnet_<name>, with the controlled UNet);
bad control inputs refused by name while the server keeps serving; a server without ControlNets
refuses a control image with the reason."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import report
from test_controlnet import NAMES, diffusers_controlnet, photo
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from pipelines.client_side import ClientSidePipeline
from pipelines.ensemble import EnsemblePipeline
from utils import specs
from utils.controlnet import ServedControlNet, canny, controlnet_folder
from utils.deployment import Deployment
from utils.export import export_network, onnx_path
from utils.grpc_client import connect, infer_inputs
from utils.repository.writer import write_repository
from utils.server import TritonServer

pytestmark = pytest.mark.server  # starts tritonserver

MAX_PIXEL_DIFFERENCE = 2
CONTROLNETS = tuple(ServedControlNet(name, "tiny") for name in NAMES)
CASES = {  # the request's ControlNet inputs and options
    "one ControlNet, Canny made from the photo": dict(
        controlnet=NAMES[:1], control_image=photo(), control_mode=["canny"], prompt="a red door", seed=5,
        num_inference_steps=8),
    "two ControlNets, scales 1 and 0.5, guidance 0-0.6 and 0.3-1": dict(
        controlnet=NAMES, control_image=np.concatenate([canny(photo()), photo(1)]), prompt="a blue window", seed=9,
        num_inference_steps=8, controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.3],
        control_guidance_end=[0.6, 1.0], num_images_per_prompt=2),
}


@pytest.fixture(scope="module")
def controlnet_server(tiny_model, exports, models_dir, tmp_path_factory):
    """The session's four networks, and the two ControlNets with the controlled UNet, exported and served."""
    onnx_dir, repository = tmp_path_factory.mktemp("onnx-controlnet"), tmp_path_factory.mktemp("repository-controlnet")
    deployment = Deployment(controlnets=CONTROLNETS)
    files = {name: exports[name].path for name in specs.NETWORKS}
    for network in deployment.control_networks():
        folder = next((controlnet_folder(c, tiny_model, models_dir) for c in CONTROLNETS
                       if specs.controlnet_model(c.name).name == network.name), None)
        files[network.name] = export_network(network, tiny_model, onnx_path(onnx_dir, "tiny", network.name),
                                             weights=folder).path
    write_repository(repository, tiny_model, files, deployment, models_dir=models_dir)
    with TritonServer(repository) as server:
        yield server


@pytest.fixture(scope="module")
def ways(controlnet_server, tiny_model) -> dict:
    url = controlnet_server.grpc_url
    client_side = ClientSidePipeline(tiny_model, url)
    return {"client-side": lambda **options: client_side(progress=False, **options), "BLS": BlsPipeline(url),
            "ensemble": EnsemblePipeline(url)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["client-side", "BLS", "ensemble"])
def test_controlnet_equals_diffusers(kind, case, ways, tiny_model, models_dir):
    options = dict(CASES[case])
    served = ways[kind](**options)
    names, images, modes = options.pop("controlnet"), options.pop("control_image"), options.pop("control_mode", [])
    if modes:  # diffusers is given the edges, as its guide makes them
        images = canny(images)
    folders = [controlnet_folder(ServedControlNet(name, "tiny"), tiny_model, models_dir) for name in names]
    expected = diffusers_controlnet(tiny_model, folders, images, **options)
    difference = int(np.abs(served.astype(int) - expected.astype(int)).max())
    report(f"{kind:<12} ControlNet vs diffusers, {case}: max pixel difference {difference} "
           f"(allowed {MAX_PIXEL_DIFFERENCE})")
    assert served.shape == expected.shape and difference <= MAX_PIXEL_DIFFERENCE


def test_a_controlnet_deployment_serves_its_ensemble_and_passes_the_canary(controlnet_server, triton_server):
    """ensemble_controlnet and its preprocess_control step where ControlNets are served, nowhere else;
    the supervisor's canary sends its graph a control image for the first ControlNet."""
    from utils.server.health import canary, served_pipelines

    served = served_pipelines(controlnet_server.model_repository)
    assert specs.ENSEMBLE_CONTROLNET in served
    assert specs.ENSEMBLE_CONTROLNET not in served_pipelines(triton_server.model_repository)
    assert not (triton_server.model_repository / specs.PREPROCESS_CONTROL.name).exists()
    canary(controlnet_server.grpc_url, pipelines=served)


def test_the_client_side_reads_the_served_controlnets_from_the_config(controlnet_server, triton_server, tiny_model):
    """The controlled UNet's config lists the ControlNets (the repository's index needs the admin key)."""
    assert ClientSidePipeline(tiny_model, controlnet_server.grpc_url).loop.controlnets == NAMES
    assert ClientSidePipeline(tiny_model, triton_server.grpc_url).loop.controlnets == ()


BAD = {  # the ControlNet inputs sent with a prompt: the message
    "a control image of an unserved size": (dict(controlnet=[b"edges"], control_image=np.zeros((1, 60, 64, 3), np.uint8)),
                                            "control_image is 60x64 pixels"),
    # refused by Triton itself, from the config's dims, naming the input
    "a grey control image": (dict(controlnet=[b"edges"], control_image=np.zeros((1, 64, 64), np.uint8)),
                             "shape for input 'control_image'"),
    "an unknown control mode": (dict(controlnet=[b"edges"], control_image=photo(), control_mode=[b"pose"]),
                                r"control_mode\[0\]='pose' is not a control mode"),
    "start after end": (dict(controlnet=[b"edges"], control_image=photo(),
                             control_guidance_start=np.array([0.9], np.float32),
                             control_guidance_end=np.array([0.1], np.float32)), "is not before control_guidance_end"),
    "an unserved ControlNet": (dict(controlnet=[b"pose"], control_image=photo()), r"controlnet\[0\]='pose' is not served"),
    "no name, where two are served": (dict(control_image=photo()), "controlnet is required"),
}


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("model", [specs.TEXT_TO_IMAGE, specs.ENSEMBLE_CONTROLNET])
def test_bad_control_inputs_are_refused_by_name_and_the_server_keeps_serving(case, model, controlnet_server):
    extra, message = BAD[case]
    client = connect(controlnet_server.grpc_url)
    inputs = {specs.PROMPT.name: np.array([b"a cat"], dtype=object), specs.NUM_INFERENCE_STEPS.name: np.array([2], np.int32)}
    extra = {name: np.array(value, dtype=object) if isinstance(value, list) else value for name, value in extra.items()}
    with pytest.raises(InferenceServerException, match=message) as refused:
        client.infer(model.name, infer_inputs({**inputs, **extra}))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    served = client.infer(model.name, infer_inputs({**inputs, specs.CONTROLNET_NAMES.name: np.array([b"edges"], object),
                                                    specs.CONTROL_IMAGE.name: photo()}))
    assert served.as_numpy(specs.IMAGES.name).shape == (1, 64, 64, 3)


def test_a_server_without_controlnets_refuses_a_control_image_with_the_reason(triton_server):
    client = connect(triton_server.grpc_url)
    with pytest.raises(InferenceServerException, match="this deployment serves no ControlNet"):
        client.infer(specs.TEXT_TO_IMAGE.name, infer_inputs({specs.PROMPT.name: np.array([b"a cat"], dtype=object),
                                                             specs.CONTROL_IMAGE.name: photo()}))


def test_the_run_scripts_send_a_control_image_from_a_file(controlnet_server, tiny_model, tmp_path):
    """--control-image FILE --control-mode canny --use-controlnet NAME: the same image from each
    way's script, and the one that the Python client makes with the same inputs."""
    from PIL import Image
    from test_scripts import run

    Image.fromarray(photo()[0]).save(tmp_path / "photo.png")
    common = ["--url", controlnet_server.grpc_url, "--num-inference-steps", "3", "--seed", "5", "--prompt", "a cat",
              "--control-image", str(tmp_path / "photo.png"), "--control-mode", "canny", "--use-controlnet", NAMES[0]]
    saved = {}
    for script, extra in (("run_client_side_pipeline", ["--model", str(tiny_model)]), ("run_bls_pipeline", []),
                          ("run_ensemble_pipeline", [])):
        run(f"scripts/{script}.py", *common, *extra, "--output", str(tmp_path / f"{script}.png"), cwd=tmp_path)
        saved[script] = np.asarray(Image.open(tmp_path / f"{script}.png"))
    expected = BlsPipeline(controlnet_server.grpc_url)(prompt="a cat", num_inference_steps=3, seed=5,
                                                      control_image=photo(), control_mode=["canny"],
                                                      controlnet=NAMES[:1])[0]
    for script, image in saved.items():
        assert np.array_equal(image, expected), script


def test_the_benchmark_measures_controlnet_against_diffusers(controlnet_server, tiny_model, models_dir, tmp_path):
    """--task controlnet: every way and diffusers' ControlNet pipeline guided by the same picture's
    edges, the ControlNet among the stages (one call a step), the same images as diffusers'."""
    from test_benchmark import run_benchmark

    printed, results = run_benchmark([
        "--model", str(tiny_model), "--models-dir", str(models_dir), "--url", controlnet_server.grpc_url,
        "--admin-key", controlnet_server.admin_key, "--task", "controlnet", "--controlnet", f"{NAMES[0]}=tiny",
        "--warmup", "1", "--runs", "2", "--num-inference-steps", "5",
        "--pipelines", "diffusers", "diffusers-fast", "triton-client-side", "triton-bls", "triton-ensemble",
        "--min-psnr", "40"], tmp_path)
    assert results["settings"]["task"] == "controlnet" and results["failed"] == {}
    assert "ctrlnet" in printed and "fidelity check passed" in printed
    for name, figures in results["pipelines"].items():
        stages = figures["stages"]
        # PNDM: 5 steps are 6 calls of the ControlNet and of the UNet (the controlled one, served)
        assert stages["controlnet"] > 0 and stages["unet_calls_per_run"] == 6, (name, stages)


def test_the_benchmark_refuses_the_controlnet_task_without_one_controlnet(tiny_model, tmp_path):
    import subprocess
    import sys

    from utils.layout import PROJECT_ROOT

    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts/benchmark_pipelines.py"), "--model",
                             str(tiny_model), "--task", "controlnet"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--task controlnet guides every request with the deployment's ControlNet: " \
                                      "give one, --controlnet NAME=PATH" in result.stderr
