"""ControlNet: the two networks it adds (exported like the others), the shared loop against
diffusers' StableDiffusionControlNetPipeline in this process (one and two ControlNets, guidance
start and end, Canny made from a photo), and the request's checks."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from pipelines.components import PipelineComponents
from pipelines.stable_diffusion import StableDiffusion
from utils import specs
from utils.controlnet import ControlNetError, ServedControlNet, canny, check_controlnet, controlnet_folder
from utils.layout import PROJECT_ROOT
from utils.networks import load_network, pack_residuals
from utils.request import GenerationRequest, InvalidRequest

SIZE = 64  # the tiny preset's image
NAMES = ("edges", "depth")


@pytest.fixture(scope="module")
def controlnets(tiny_model, models_dir) -> dict[str, object]:
    """Two tiny ControlNets for the tiny checkpoint, by name: their folders."""
    return {name: controlnet_folder(ServedControlNet(name, "tiny"), tiny_model, models_dir) for name in NAMES}


def photo(seed: int = 0) -> np.ndarray:
    """A picture with edges: a few flat rectangles on a background, [1, H, W, 3]."""
    rng = np.random.default_rng(seed)
    image = np.full((1, SIZE, SIZE, 3), 40, dtype=np.uint8)
    for _ in range(4):
        top, left = rng.integers(0, SIZE - 16, 2)
        image[0, top:top + 16, left:left + 20] = rng.integers(60, 255, 3)
    return image


def in_process(model_dir, controlnets: dict, calls: dict | None = None) -> StableDiffusion:
    """The loop with each network a torch module in this process, the ControlNets served by their
    names; ``calls`` counts each served model's calls."""
    networks = {name: load_network(name, model_dir) for name in (*specs.NETWORKS, specs.CONTROLLED_UNET.name)}
    networks |= {specs.controlnet_model(name).name: load_network(specs.CONTROLNET.name, folder)
                 for name, folder in controlnets.items()}

    def call(network, *inputs, adapters=()):
        if calls is not None:
            calls[network.name] = calls.get(network.name, 0) + 1
        with torch.no_grad():
            return (networks[network.name](*inputs),)

    return StableDiffusion(PipelineComponents.from_pretrained(model_dir), call, controlnets=tuple(controlnets))


def diffusers_controlnet(model_dir, folders: list, control_images: np.ndarray, seed: int, **options) -> np.ndarray:
    """StableDiffusionControlNetPipeline's images, uint8, with these ControlNets (a list: diffusers'
    MultiControlNetModel) and control images (as PIL images)."""
    import diffusers
    from PIL import Image

    controlnets = [diffusers.ControlNetModel.from_pretrained(folder) for folder in folders]
    pipeline = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        model_dir, controlnet=controlnets if len(controlnets) > 1 else controlnets[0], safety_checker=None,
        requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    images = [Image.fromarray(image) for image in control_images]
    images = pipeline(image=images if len(images) > 1 else images[0], generator=torch.Generator().manual_seed(seed),
                      output_type="np", **options).images
    return (images * 255).round().astype(np.uint8)


CASES = {  # name: (ControlNets, options)
    "one ControlNet": (NAMES[:1], dict()),
    "one ControlNet, scale 0.6, 2 images per prompt": (NAMES[:1], dict(controlnet_conditioning_scale=0.6,
                                                                      num_images_per_prompt=2)),
    "one ControlNet, guidance 0.2-0.7": (NAMES[:1], dict(control_guidance_start=0.2, control_guidance_end=0.7)),
    "two ControlNets, scales 1 and 0.5, the second from 0.5": (NAMES, dict(controlnet_conditioning_scale=[1.0, 0.5],
                                                                           control_guidance_start=[0.0, 0.5],
                                                                           control_guidance_end=[1.0, 1.0])),
    "two ControlNets, guidance 1 (no unconditional rows)": (NAMES, dict(guidance_scale=1.0)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_loop_follows_the_controlnets_as_diffusers(case, tiny_model, controlnets):
    from conftest import report

    names, options = CASES[case]
    edges = canny(photo())
    control_images = np.concatenate([edges, photo(1)])[:len(names)]
    options = dict(prompt=["a red door"], num_inference_steps=6, **options)
    ours = in_process(tiny_model, controlnets)(GenerationRequest(
        controlnet=names, control_image=control_images, seed=3, **options))
    reference = diffusers_controlnet(tiny_model, [controlnets[name] for name in names], control_images, seed=3,
                                     **options)
    difference = int(np.abs(ours.numpy().astype(int) - reference.astype(int)).max())
    report(f"ControlNet in process vs diffusers, {case}: max pixel difference {difference} (allowed 2)")
    assert ours.shape == reference.shape and difference <= 2
    general = {key: value for key, value in options.items() if key in ("prompt", "num_inference_steps",
                                                                       "num_images_per_prompt", "guidance_scale")}
    plain = in_process(tiny_model, controlnets)(GenerationRequest(seed=3, **general))
    changed = int(np.abs(ours.numpy().astype(int) - plain.numpy().astype(int)).max())
    assert changed > 2, changed  # the ControlNet changed the image by more than the tolerance


def test_canny_sent_as_a_photo_equals_the_edges_sent(tiny_model, controlnets):
    """control_mode canny: the server makes the edges from the photo, as diffusers' guide does with OpenCV."""
    pipeline = in_process(tiny_model, {"edges": controlnets["edges"]})
    request = dict(prompt=["a"], num_inference_steps=2, seed=0)
    from_photo = pipeline(GenerationRequest(control_image=photo(), control_mode=["canny"], **request))
    from_edges = pipeline(GenerationRequest(control_image=canny(photo()), **request))
    assert torch.equal(from_photo, from_edges)
    assert set(np.unique(canny(photo()))) == {0, 255}


def test_a_controlnet_is_called_only_in_its_fraction_of_the_steps(tiny_model, controlnets):
    calls = {}
    in_process(tiny_model, controlnets, calls)(GenerationRequest(
        prompt=["a"], num_inference_steps=10, seed=0, controlnet=NAMES, control_image=np.concatenate([photo()] * 2),
        control_guidance_start=[0.0, 0.5], control_guidance_end=[0.3, 1.0]))
    # PNDM's 10 steps are 11 timesteps; diffusers' rule keeps step i where i/11 >= start and (i+1)/11 <= end:
    # steps 0-2 for the first, 6-10 for the second, and the three steps in neither run the plain UNet.
    first, second = (calls[specs.controlnet_model(name).name] for name in NAMES)
    assert (first, second) == (3, 5)
    assert calls[specs.CONTROLLED_UNET.name] == 8 and calls[specs.UNET.name] == 3


def test_the_controlled_unet_adds_the_residuals_where_diffusers_does(tiny_model, controlnets):
    """At a size that is neither square nor a multiple of the downsampling (9x7 latents), the
    packed residuals unpacked give diffusers' UNet given them as lists; zeros give the plain UNet."""
    import diffusers

    dims = specs.ModelDims.from_pretrained(tiny_model).at_size(72, 56)
    unet, controlled = (load_network(name, tiny_model) for name in (specs.UNET.name, specs.CONTROLLED_UNET.name))
    model = diffusers.ControlNetModel.from_pretrained(controlnets["edges"])
    inputs = load_network(specs.CONTROLNET.name, controlnets["edges"]).example_inputs(
        2, dims, torch.Generator().manual_seed(0))
    with torch.no_grad():
        down, mid = model(*inputs, return_dict=False)
        expected = unet.unet(*inputs[:3], down_block_additional_residuals=down, mid_block_additional_residual=mid,
                             return_dict=False)[0]
        assert torch.equal(controlled(*inputs[:3], pack_residuals((*down, mid))), expected)
        assert torch.equal(controlled(*inputs[:3], torch.zeros(2, dims.residual_values)), unet(*inputs[:3]))


def test_the_packed_residuals_have_the_layout_the_specs_read(tiny_model, controlnets):
    """At a size that is not a multiple of the UNet's downsampling (odd latents), the ControlNet's
    residuals, packed, have ModelDims.residual_values values, in ModelDims.residual_layout's order."""
    import diffusers

    dims = specs.ModelDims.from_pretrained(tiny_model).at_size(72, 56)
    model = diffusers.ControlNetModel.from_pretrained(controlnets["edges"])
    wrapper = load_network(specs.CONTROLNET.name, controlnets["edges"])
    inputs = wrapper.example_inputs(1, dims, torch.Generator().manual_seed(0))
    with torch.no_grad():
        down, mid = model(*inputs, return_dict=False)
        packed = wrapper(*inputs)
    assert [tuple(r.shape[1:]) for r in (*down, mid)] == [
        (channels, -(-dims.latent_height // 2 ** level), -(-dims.latent_width // 2 ** level))
        for channels, level in dims.residual_layout]
    assert packed.shape == (1, dims.residual_values) and torch.equal(packed, pack_residuals((*down, mid)))


def test_guidance_cut_off_with_a_controlnet_equals_diffusers_cutting_the_control_image_too(tiny_model, controlnets):
    """cfg_cutoff_step_ratio: from the cut, the ControlNet sees the conditional rows alone, as
    diffusers does with a callback that cuts the control image with the prompt embeddings (as its
    SDXLControlnetCFGCutoffCallback does for SDXL; SD1.5's SDCFGCutoffCallback leaves the image doubled)."""
    from diffusers.callbacks import PipelineCallback

    class CutControlToo(PipelineCallback):
        tensor_inputs = ["prompt_embeds", "image"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
                pipeline._guidance_scale = 0.0
                return {"prompt_embeds": callback_kwargs["prompt_embeds"].chunk(2)[1],
                        "image": callback_kwargs["image"].chunk(2)[1]}
            return callback_kwargs

    options = dict(prompt=["a red door"], num_inference_steps=6)
    ours = in_process(tiny_model, controlnets)(GenerationRequest(
        controlnet=NAMES[:1], control_image=canny(photo()), seed=3, cfg_cutoff_step_ratio=0.4, **options))
    reference = diffusers_controlnet(tiny_model, [controlnets[NAMES[0]]], canny(photo()), seed=3,
                                     callback_on_step_end=CutControlToo(cutoff_step_ratio=0.4), **options)
    assert int(np.abs(ours.numpy().astype(int) - reference.astype(int)).max()) <= 2


def test_a_controlnet_of_another_checkpoint_is_refused_by_name(tiny_model, tmp_path):
    import diffusers

    other = diffusers.ControlNetModel(block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=32,
                                      attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                      norm_num_groups=16, conditioning_embedding_out_channels=(8, 8, 16, 16))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ControlNetError, match=r"--controlnet x=other: its residuals .* does not match"):
        check_controlnet(tiny_model, tmp_path / "other", "--controlnet x=other")
    with pytest.raises(ControlNetError, match="no config.json"):
        check_controlnet(tiny_model, tmp_path, "--controlnet x=" + str(tmp_path))


def test_a_controlnet_that_pools_its_residuals_is_refused(tiny_model, controlnets, tmp_path):
    """global_pool_conditions (SD1.5's shuffle ControlNet): residuals of one value per channel,
    which the packed contract does not carry."""
    import json
    import shutil

    pooled = shutil.copytree(controlnets["edges"], tmp_path / "pooled")
    config = json.loads((pooled / "config.json").read_text())
    (pooled / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    with pytest.raises(ControlNetError, match="its global_pool_conditions True does not match the checkpoint's False"):
        check_controlnet(tiny_model, pooled, "--controlnet shuffle=pooled")


def test_arrays_from_a_python_client_are_checked_like_lists(tiny_model, controlnets):
    request = in_process(tiny_model, controlnets).check(GenerationRequest(
        prompt=["a"], controlnet=np.array(NAMES), control_image=np.concatenate([photo()] * 2),
        controlnet_conditioning_scale=np.array([1.0, 0.5], np.float32)))
    assert request.controlnet == NAMES and request.controlnet_conditioning_scale == (1.0, 0.5)


def test_a_control_flag_without_a_control_image_is_refused_by_name(tiny_model, controlnets):
    """The run scripts pass every ControlNet flag on: one given alone is refused, not dropped."""
    import argparse

    from utils.cli import add_generation_arguments, generation_options

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    options = generation_options(parser.parse_args(["--controlnet-conditioning-scale", "0.5"]))
    with pytest.raises(InvalidRequest, match=r"controlnet_conditioning_scale=\[0.5\] applies to ControlNet"):
        in_process(tiny_model, controlnets).check(GenerationRequest(**options))


BAD = {  # request fields: what the error names
    "a control image of floats": (dict(control_image=np.zeros((1, SIZE, SIZE, 3), np.float32)), "control_image is float32"),
    "a grey control image": (dict(control_image=np.zeros((1, SIZE, SIZE), np.uint8)), "control_image has shape"),
    "two control images for one ControlNet": (dict(control_image=np.zeros((2, SIZE, SIZE, 3), np.uint8)),
                                              r"control_image has shape \[2, 64, 64, 3\]: send \[N, H, W, 3\] \(N = 1\)"),
    "a control image of an unserved size": (dict(control_image=np.zeros((1, 60, SIZE, 3), np.uint8)),
                                            "control_image is 60x64 pixels"),
    "a height that is not the control image's": (dict(control_image=photo(), height=72), "height=72 differs"),
    "start after end": (dict(control_image=photo(), control_guidance_start=0.8, control_guidance_end=0.2),
                        r"control_guidance_start\[0\]=0.8 is not before"),
    "a NaN scale": (dict(control_image=photo(), controlnet_conditioning_scale=float("nan")),
                    r"controlnet_conditioning_scale\[0\]=nan is not allowed"),
    "an unknown control mode": (dict(control_image=photo(), control_mode=["depth-from-photo"]),
                                r"control_mode\[0\]='depth-from-photo' is not a control mode"),
    "an unserved ControlNet": (dict(controlnet=["pose"], control_image=photo()), r"controlnet\[0\]='pose' is not served"),
    "a scale without a control image": (dict(controlnet_conditioning_scale=0.5), "applies to ControlNet"),
    "two scales for one ControlNet": (dict(control_image=photo(), controlnet_conditioning_scale=[1.0, 0.5, 0.2]),
                                      "has 3 values for 1 ControlNets"),
    "an image to start from": (dict(control_image=photo(), image=photo()), "image is not served with a ControlNet"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_control_inputs_are_refused_by_name(case, tiny_model, controlnets):
    fields, message = BAD[case]
    pipeline = in_process(tiny_model, {"edges": controlnets["edges"]})
    with pytest.raises(InvalidRequest, match=message):
        pipeline.check(GenerationRequest(prompt=["a"], **fields))


def test_a_deployment_without_controlnets_says_how_to_serve_one(tiny_model):
    pipeline = in_process(tiny_model, {})
    with pytest.raises(InvalidRequest, match="serves no ControlNet; leave the ControlNet inputs out"):
        pipeline.check(GenerationRequest(prompt=["a"], control_image=photo()))


def test_several_controlnets_need_names(tiny_model, controlnets):
    with pytest.raises(InvalidRequest, match="controlnet is required: this deployment serves 2 ControlNets"):
        in_process(tiny_model, controlnets).check(GenerationRequest(prompt=["a"], control_image=photo()))


@pytest.fixture(scope="module")
def control_exports(tiny_model, models_dir, tmp_path_factory) -> tuple[object, str]:
    """optim/convert_controlnet_to_onnx.py (a graph per ControlNet named) and
    convert_controlled_unet_to_onnx.py, run once: their ONNX folder and what they printed."""
    import contextlib
    import io

    from utils.cli import export_cli

    onnx_dir = tmp_path_factory.mktemp("onnx-control")
    common = ["--model", str(tiny_model), "--models-dir", str(models_dir), "--onnx-dir", str(onnx_dir)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export_cli(specs.CONTROLNET, common + [flag for name in NAMES for flag in ("--controlnet", f"{name}=tiny")])
        export_cli(specs.CONTROLLED_UNET, common)
    return onnx_dir / tiny_model.name, printed.getvalue()


def test_the_control_networks_export_from_the_specs(control_exports):
    """The specs' names and dynamic axes (the residuals' length among them), checked against torch
    at another batch and size by the export itself."""
    from conftest import report
    from utils.export import TOLERANCE

    folder, printed = control_exports
    for network in (*(specs.controlnet_model(name) for name in NAMES), specs.CONTROLLED_UNET):
        graph = onnx.load(str(folder / f"{network.name}.onnx"))
        axes = {t.name: [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]
                for t in (*graph.graph.input, *graph.graph.output)}
        assert list(axes) == network.input_names + network.output_names
        assert axes[specs.CONTROLNET.outputs[0].name] == [specs.BATCH_AXIS, "residual_values"]
        error = float(printed.split(f"{network.name}: wrote")[1].split("= ")[1].split()[0])
        report(f"export {network.name:<16} max |onnxruntime - torch| = {error:.2e}")
        assert error <= TOLERANCE["FP32"]


def test_a_tensorrt_repository_builds_an_engine_per_controlnet(control_exports, exports, tiny_model, tmp_path):
    """Each ControlNet and the controlled UNet get a TensorRT model and a trtexec command whose
    profile spans the residuals' length at the smallest, the checkpoint's and the largest size served."""
    from utils.deployment import Deployment
    from utils.repository import configs
    from utils.repository.writer import write_repository

    folder, _ = control_exports
    files = {name: exports[name].path for name in specs.NETWORKS}
    files |= {path.stem: path for path in folder.glob("*.onnx")}
    deployment = Deployment(backend="tensorrt", controlnets=tuple(ServedControlNet(name, "tiny") for name in NAMES))
    write_repository(tmp_path, tiny_model, files, deployment)
    config = configs.parse_pbtxt((tmp_path / specs.CONTROLLED_UNET.name / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.parameters["controlnets"].string_value == ",".join(NAMES)
    script = PROJECT_ROOT / "scripts" / "build_tensorrt_engines.py"  # run as users run it
    printed = subprocess.run([sys.executable, str(script), "--repository", str(tmp_path), "--print-commands"],
                             capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    commands = {re.search(r"--onnx=\S*/([^/ ]+)/1/model.onnx", line)[1]: line for line in printed.splitlines()}
    assert set(commands) == {*specs.NETWORKS, specs.CONTROLLED_UNET.name, *(f"controlnet_{name}" for name in NAMES)}
    dims, sizes = specs.ModelDims.from_pretrained(tiny_model), specs.ImageSizes.default(specs.ModelDims.from_pretrained(tiny_model))
    lengths = [dims.at_size(size, size).residual_values for size in (sizes.min, dims.image_height, sizes.max)]
    profile = specs.CONTROLLED_UNET.profile
    for flag, batch, length in zip(("min", "opt", "max"), (profile.min, profile.opt, profile.max), lengths):
        assert f"--{flag}Shapes=" in commands[specs.CONTROLLED_UNET.name]
        assert f"residuals:{batch}x{length}" in commands[specs.CONTROLLED_UNET.name]
