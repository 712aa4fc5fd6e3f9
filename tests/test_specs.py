"""The tensor contract of utils/specs.py, and the presets that feed it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from utils import specs
from utils.models import PRESETS, SD15_SCHEDULER, model_slug, resolve_model

ROOT = Path(__file__).resolve().parents[1]
SD15 = specs.ModelDims(text_length=77, text_hidden=768, latent_channels=4, latent_height=64, latent_width=64,
                       vae_scale_factor=8)


def test_sd15_contract_at_prompt_batch_b():
    b = 2
    cfg = 2 * b  # classifier-free guidance doubles the text encoder and UNet batch
    # A row per 77-token chunk of a prompt, with its attention mask and the layers clip_skip skips.
    assert specs.TEXT_ENCODER.input_shapes(cfg, SD15) == {"input_ids": (cfg, 77), "attention_mask": (cfg, 77),
                                                          "skipped_layers": (cfg,)}
    assert specs.UNET.input_shapes(cfg, SD15) == {
        "sample": (cfg, 4, 64, 64), "timestep": (cfg,), "encoder_hidden_states": (cfg, 77, 768),
    }
    # A long prompt: its chunks joined (3 of 77 tokens at most), positive and negative alike.
    assert specs.UNET.input_shapes(cfg, SD15.at_size(512, 512, prompt_chunks=3))["encoder_hidden_states"] == (
        cfg, 231, 768)
    assert specs.UNET.shape(specs.UNET.outputs[0], cfg, SD15) == (cfg, 4, 64, 64)
    assert specs.TEXT_ENCODER.shape(specs.TEXT_ENCODER.outputs[0], cfg, SD15) == (cfg, 77, 768)
    assert specs.VAE_ENCODER.input_shapes(b, SD15) == {"image": (b, 3, 512, 512)}
    assert specs.VAE_ENCODER.shape(specs.VAE_ENCODER.outputs[0], b, SD15) == (b, 8, 64, 64)
    assert specs.VAE_DECODER.input_shapes(b, SD15) == {"sample": (b, 4, 64, 64)}
    assert specs.VAE_DECODER.shape(specs.VAE_DECODER.outputs[0], b, SD15) == (b, 3, 512, 512)


def test_dtypes_and_precision():
    assert specs.TEXT_ENCODER.inputs[0].resolved_dtype("FP16") == "INT32"
    timestep = specs.UNET.inputs[1]
    assert timestep.name == "timestep" and timestep.resolved_dtype("FP16") == "FP32"  # fractional timesteps
    assert {t.resolved_dtype("FP16") for t in specs.UNET.tensors if t is not timestep} == {"FP16"}
    assert {t.resolved_dtype("FP32") for n in specs.NETWORKS.values() for t in n.tensors} == {"INT32", "FP32"}


def test_profiles_and_cfg_doubling():
    # The served UNet batches 8 requests' steps (16 rows with their unconditional halves).
    assert specs.UNET.profile == specs.BatchProfile(1, 2, 16) and specs.UNET.cfg_doubled
    # The text encoder takes a row per chunk of each prompt: more rows than the UNet.
    assert specs.TEXT_ENCODER.profile == specs.BatchProfile(1, 2, 64) and specs.TEXT_ENCODER.cfg_doubled
    assert specs.VAE_ENCODER.profile == specs.VAE_DECODER.profile == specs.BatchProfile(1, 1, 4)
    assert specs.TEXT_TO_IMAGE.max_prompts() == 4  # the VAE decoder's max: 4 images per request
    assert specs.TEXT_ENCODER.dynamic_axes() == {t.name: {0: "batch"} for t in specs.TEXT_ENCODER.tensors}
    # The image's height and width are dynamic too, wherever a tensor has them; and the prompt's length.
    assert specs.UNET.dynamic_axes()["sample"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    assert specs.UNET.dynamic_axes()["encoder_hidden_states"] == {0: "batch", 1: "prompt_length"}
    assert specs.VAE_DECODER.dynamic_axes()["image"] == {0: "batch", 2: "image_height", 3: "image_width"}


def test_default_image_sizes_surround_the_checkpoints_own():
    sd15 = specs.ModelDims(text_length=77, text_hidden=768, latent_channels=4, latent_height=64, latent_width=64,
                           vae_scale_factor=8)
    assert specs.ImageSizes.default(sd15) == specs.ImageSizes(384, 768, 8)
    tiny = sd15.at_size(64, 64)
    assert specs.ImageSizes.default(tiny) == specs.ImageSizes(48, 96, 8)
    sizes = specs.ImageSizes.default(sd15)
    assert sizes.allows(384) and sizes.allows(520) and sizes.allows(768)
    assert not sizes.allows(376) and not sizes.allows(516) and not sizes.allows(776)
    assert sd15.at_size(392, 768).latent_height == 49 and sd15.at_size(392, 768).latent_width == 96


def test_wire_shape_of_a_per_sample_scalar():
    timestep = specs.UNET.inputs[1]
    assert timestep.dims == () and timestep.wire_dims == (1,)
    assert tuple(timestep.to_wire(torch.zeros(4)).shape) == (4, 1)
    sample = specs.UNET.inputs[0]
    assert sample.to_wire(torch.zeros(2, 4, 8, 8)).shape == (2, 4, 8, 8)


def test_sd15_random_preset_is_the_sd15_architecture():
    """Built on the meta device: the exact SD1.5 parameter counts and sizes, with no weights made."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    architecture = PRESETS["sd15-random"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**architecture["unet"])
        vae = AutoencoderKL(**architecture["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**architecture["text_encoder"]))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text_encoder) == 123_060_480
    assert SD15_SCHEDULER["beta_schedule"] == "scaled_linear" and SD15_SCHEDULER["skip_prk_steps"]


def test_tiny_preset_is_a_diffusers_folder_with_its_own_sizes(tiny_model):
    assert {p.name for p in tiny_model.iterdir()} >= {
        "model_index.json", "text_encoder", "unet", "vae", "tokenizer", "scheduler",
    }
    dims = specs.ModelDims.from_pretrained(tiny_model)
    assert dims == specs.ModelDims(text_length=77, text_hidden=32, latent_channels=4, latent_height=8,
                                   latent_width=8, vae_scale_factor=8,
                                   # conv_in, a resnet and the downsampler of block 0, a resnet of block 1, the mid block
                                   residual_layout=((32, 0), (32, 0), (32, 1), (64, 1), (64, 1)), text_layers=2)
    assert dims.image_height == 64  # h = H/8, as for SD1.5


def test_tiny_preset_is_deterministic(tiny_model, tmp_path):
    from safetensors.torch import load_file

    again = resolve_model("tiny", tmp_path)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        first, second = load_file(tiny_model / part), load_file(again / part)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_preset_built_by_two_processes_at_once_keeps_the_first(tiny_model, tmp_path):
    """Scripts started side by side each build a missing preset; the one that finishes second
    finds the folder there (the rename fails) and uses it rather than failing."""
    import shutil

    from utils.models import build_preset

    target = tmp_path / "tiny"
    shutil.copytree(tiny_model, target)
    (target / "first.txt").write_text("the first process's copy")
    assert build_preset("tiny", target, seed=0) == target
    assert (target / "first.txt").read_text() == "the first process's copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging folder left


def test_local_tokenizer_tokenizes_any_text(tiny_model):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    ids = tokenizer(["a photo", "Ünïcödé 🚀 text"], padding="max_length", max_length=16, truncation=True).input_ids
    assert all(len(row) == 16 and row[0] == tokenizer.bos_token_id for row in ids)
    assert ids[0] != ids[1] and tokenizer.unk_token_id not in ids[1][1:3]


@pytest.mark.parametrize("model, message", [
    ("no-such-preset", r"neither a preset \(tiny, sd15-random, tiny-inpaint, sd15-random-inpaint, tiny-sdxl, tiny-sdxl-refiner, "
                       r"sdxl-random, sdxl-refiner-random\)"),
    (".", r"not a diffusers pipeline \(no model_index.json\)"),
])
def test_model_source_errors_name_the_value_and_the_fix(model, message):
    with pytest.raises(ValueError, match=message):
        resolve_model(model)


def test_model_slug():
    assert model_slug("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5--stable-diffusion-v1-5"
    assert model_slug("tiny") == "tiny"


def test_tensor_names_are_typed_only_in_the_specs():
    """No source file outside utils/specs.py spells a network's tensor name as a string literal
    (but the tutorial's stand-alone example, which imports nothing of the project's on purpose:
    tests/test_minimal_bls.py holds it to the specs)."""
    names = {t.name for n in specs.NETWORKS.values() for t in n.tensors}
    offenders = []
    for folder in ("utils", "pipelines", "triton", "scripts", "optim"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "specs.py" or (ROOT / "triton" / "examples") in path.parents:
                continue
            tree = ast.parse(path.read_text())
            paths = {id(arg) for call in ast.walk(tree) if isinstance(call, ast.Call)
                     and getattr(call.func, "id", None) == "Path" for arg in call.args}  # folder names
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in names and id(node) not in paths:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "tensor names typed outside the specs:\n" + "\n".join(offenders)


def test_pipeline_inputs_are_the_request_fields():
    """The BLS inputs are GenerationRequest's fields by name, so requests map to tensors without
    a second list of names (utils/request.py, request_to_arrays/request_from_arrays)."""
    import dataclasses

    from utils.request import GenerationRequest

    fields = [f.name for f in dataclasses.fields(GenerationRequest)]
    # Each task takes its own: image to image the image and strength, text to image the size.
    assert set(fields) == {t.name for spec in (specs.TEXT_TO_IMAGE, specs.IMAGE_TO_IMAGE) for t in spec.inputs}


def test_few_step_schedulers_take_the_steps_their_schedule_has():
    """LCM and TCD draw their steps from original_inference_steps (diffusers' default, which the
    checkpoint's scheduler config does not set): more is refused before any network runs."""
    import inspect

    import diffusers

    from utils.request import FEW_STEP_MAX_STEPS, FEW_STEP_SCHEDULERS, GenerationRequest, InvalidRequest, check_request

    for name in FEW_STEP_SCHEDULERS:
        signature = inspect.signature(getattr(diffusers, name).__init__)
        assert signature.parameters["original_inference_steps"].default == FEW_STEP_MAX_STEPS, name
        check_request(GenerationRequest(prompt="a cat", scheduler=name, num_inference_steps=FEW_STEP_MAX_STEPS),
                      max_prompts=4, max_steps=999)
        with pytest.raises(InvalidRequest, match=rf"num_inference_steps={FEW_STEP_MAX_STEPS + 1} is not allowed "
                                                 rf"with {name}: use at most {FEW_STEP_MAX_STEPS}"):
            check_request(GenerationRequest(prompt="a cat", scheduler=name, num_inference_steps=FEW_STEP_MAX_STEPS + 1),
                          max_prompts=4, max_steps=999)
