"""SDXL from the same specs: the tiny SDXL base and refiner presets, their networks exported and
checked as SD1.5's are, the shared loop against diffusers' StableDiffusionXLPipeline,
StableDiffusionXLImg2ImgPipeline and base + refiner (diffusers' ensemble of expert denoisers) in
this process, and the SDXL inputs' checks (an SD1.5 deployment refuses them by name)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import report

from pipelines.components import PipelineComponents
from pipelines.stable_diffusion import StableDiffusion
from utils import families, specs
from utils.export import export_network
from utils.networks import load_network
from utils.request import GenerationRequest, InvalidRequest

MAX_PIXEL_DIFFERENCE = 2
GUIDANCE = 7.5  # not SDXL's default (5): both sides are given it, except where a case leaves it out


@pytest.fixture(scope="module")
def in_process(tiny_sdxl, tiny_refiner) -> StableDiffusion:
    """The loop with each network (the refiner's UNet too) a torch module in this process."""
    networks = {name: load_network(name, tiny_sdxl) for name in families.SDXL.networks}
    networks[families.REFINER_UNET.name] = load_network(families.REFINER_UNET.name, tiny_refiner)

    def call(network, *inputs, adapters=()):
        with torch.no_grad():
            outputs = networks[network.name](*inputs)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    return StableDiffusion(PipelineComponents(tiny_sdxl), call, refiner=PipelineComponents(tiny_refiner))


@pytest.fixture(scope="module")
def diffusers_sdxl(tiny_sdxl, tiny_refiner):
    """diffusers' three SDXL pipelines on the same folders; the refiner shares the base's second
    text encoder and VAE, as diffusers' documentation loads it."""
    import diffusers

    base = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    image_to_image = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_refiner, text_encoder_2=base.text_encoder_2, vae=base.vae)
    for pipeline in (base, image_to_image, refiner):
        pipeline.set_progress_bar_config(disable=True)
    return {"base": base, "image to image": image_to_image, "refiner": refiner}


def pictures(output) -> np.ndarray:
    return np.stack([np.asarray(image) for image in output.images])


def photo(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


CASES = {  # name: our request's options; diffusers gets the same, single prompts as strings
    "text to image": dict(prompt=["a red door by the sea"]),
    "a negative prompt, 2 images per prompt": dict(prompt=["a red door by the sea"], negative_prompt=["blurry"],
                                                   num_images_per_prompt=2),
    "prompt_2 and the size conditions": dict(prompt=["a red door"], prompt_2=["an oil painting"],
                                             original_size=(128, 96), crops_coords_top_left=(8, 4),
                                             target_size=(64, 64)),
    "two prompts, guidance 1": dict(prompt=["a cat", "a red door"], guidance_scale=1.0),
    "no guidance scale: SDXL's default": dict(prompt=["a red door by the sea"], guidance_scale=None),
}


def _as_diffusers(options: dict) -> dict:
    options = {name: value for name, value in {"guidance_scale": GUIDANCE, **options}.items() if value is not None}
    for name in ("prompt", "prompt_2", "negative_prompt"):
        if name in options and len(options[name]) == 1:
            options[name] = options[name][0]
    return options


@pytest.mark.parametrize("case", CASES)
def test_the_loop_equals_diffusers_sdxl(case, in_process, diffusers_sdxl):
    options = {"num_inference_steps": 5, "guidance_scale": GUIDANCE, **CASES[case]}
    ours = in_process(GenerationRequest(seed=3, **options)).numpy()
    expected = pictures(diffusers_sdxl["base"](generator=torch.Generator().manual_seed(3), output_type="pil",
                                               **_as_diffusers(options)))
    difference = int(np.abs(ours.astype(int) - expected.astype(int)).max())
    report(f"SDXL in process vs diffusers, {case}: max pixel difference {difference} (allowed {MAX_PIXEL_DIFFERENCE})")
    assert ours.shape == expected.shape and expected.std() > 5
    assert difference <= MAX_PIXEL_DIFFERENCE


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"])
def test_another_scheduler_and_size_equal_diffusers_sdxl(scheduler, in_process, diffusers_sdxl):
    """A scheduler the request chooses, at a size other than the checkpoint's (48x80 for its 64x64)."""
    import diffusers

    options = dict(num_inference_steps=6, guidance_scale=GUIDANCE, height=48, width=80)
    ours = in_process(GenerationRequest(prompt=["a red door"], seed=4, scheduler=scheduler, **options)).numpy()
    pipeline = diffusers_sdxl["base"]
    default = pipeline.scheduler
    pipeline.scheduler = getattr(diffusers, scheduler).from_config(default.config)
    try:
        expected = pictures(pipeline(prompt="a red door", generator=torch.Generator().manual_seed(4), **options))
    finally:
        pipeline.scheduler = default
    difference = int(np.abs(ours.astype(int) - expected.astype(int)).max())
    report(f"SDXL in process vs diffusers, {scheduler} at 48x80: max pixel difference {difference} "
           f"(allowed {MAX_PIXEL_DIFFERENCE})")
    assert ours.shape == expected.shape == (1, 48, 80, 3) and difference <= MAX_PIXEL_DIFFERENCE


def test_image_to_image_equals_diffusers_sdxl_img2img(in_process, diffusers_sdxl):
    """With the family's default strength (diffusers' SDXL image to image: 0.3, not SD1.5's 0.8)."""
    from PIL import Image

    ours = in_process(GenerationRequest(prompt=["a red door"], image=photo()[None], seed=5, num_inference_steps=10,
                                        guidance_scale=GUIDANCE)).numpy()
    expected = pictures(diffusers_sdxl["image to image"](
        prompt="a red door", image=Image.fromarray(photo()), generator=torch.Generator().manual_seed(5),
        num_inference_steps=10, guidance_scale=GUIDANCE, output_type="pil"))
    difference = int(np.abs(ours.astype(int) - expected.astype(int)).max())
    report(f"SDXL image to image in process vs diffusers: max pixel difference {difference} "
           f"(allowed {MAX_PIXEL_DIFFERENCE})")
    assert difference <= MAX_PIXEL_DIFFERENCE


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_base_then_refiner_equals_diffusers_ensemble_of_expert_denoisers(fraction, in_process, diffusers_sdxl):
    options = dict(prompt="a red door", num_inference_steps=10, guidance_scale=GUIDANCE)
    ours = in_process(GenerationRequest(**{**options, "prompt": [options["prompt"]]}, seed=7,
                                        high_noise_frac=fraction)).numpy()
    generator = torch.Generator().manual_seed(7)
    latents = diffusers_sdxl["base"](**options, denoising_end=fraction, output_type="latent", generator=generator).images
    expected = pictures(diffusers_sdxl["refiner"](**options, denoising_start=fraction, image=latents,
                                                  generator=generator, output_type="pil"))
    base_alone = in_process(GenerationRequest(**{**options, "prompt": [options["prompt"]]}, seed=7)).numpy()
    difference = int(np.abs(ours.astype(int) - expected.astype(int)).max())
    report(f"SDXL base + refiner (high_noise_frac {fraction}) in process vs diffusers: max pixel difference "
           f"{difference} (allowed {MAX_PIXEL_DIFFERENCE})")
    assert difference <= MAX_PIXEL_DIFFERENCE
    assert np.abs(ours.astype(int) - base_alone.astype(int)).max() > MAX_PIXEL_DIFFERENCE, "the refiner changed nothing"


@pytest.mark.slow
@pytest.mark.parametrize("network", [*families.SDXL.networks, families.REFINER_UNET.name])
def test_sdxl_networks_export_from_the_specs(network, tiny_sdxl, tiny_refiner, tmp_path):
    """Each network exports with the specs' names and dynamic axes and matches torch (the refiner's
    UNet from its own checkpoint)."""
    import onnx

    spec = families.REFINER_UNET if network == families.REFINER_UNET.name else families.SDXL.networks[network]
    model_dir = tiny_refiner if spec is families.REFINER_UNET else tiny_sdxl
    result = export_network(spec, model_dir, tmp_path / f"{network}.onnx")
    graph = onnx.load(str(result.path), load_external_data=False).graph
    assert [t.name for t in graph.input] == spec.input_names and [t.name for t in graph.output] == spec.output_names
    assert result.max_abs_error < 1e-4


def test_the_family_follows_from_the_checkpoint(tiny_sdxl, tiny_refiner, tiny_model):
    dims = {name: specs.ModelDims.from_pretrained(folder)
            for name, folder in (("sdxl", tiny_sdxl), ("refiner", tiny_refiner), ("sd", tiny_model))}
    assert families.family_of(dims["sdxl"]) is families.SDXL and families.family_of(dims["sd"]) is families.SD
    assert families.family_of(dims["refiner"]) is families.SDXL_REFINER
    sdxl = dims["sdxl"]  # the UNet's text features: both text encoders' joined
    assert sdxl.unet_text_hidden == sdxl.text_hidden + sdxl.text_hidden_2 and sdxl.time_ids == 6
    assert dims["refiner"].unet_text_hidden == sdxl.text_hidden_2 and dims["refiner"].time_ids == 5


REFUSED = {  # request options: what the message must say
    "prompt_2 on SD1.5": (dict(prompt_2=["x"]), "prompt_2 is an SDXL input"),
    "original_size on SD1.5": (dict(original_size=(64, 64)), "original_size is an SDXL input"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_an_sd15_deployment_refuses_sdxl_inputs_by_name(case, tiny_model):
    options, message = REFUSED[case]
    pipeline = StableDiffusion(PipelineComponents(tiny_model), lambda *a, **k: None)
    with pytest.raises(InvalidRequest, match=message):
        pipeline.check(GenerationRequest(prompt=["a cat"], **options))


SDXL_REFUSED = {
    "a size of three values": (dict(original_size=(64, 64, 3)), r"original_size=\[64, 64, 3\] is not allowed"),
    "a negative crop": (dict(crops_coords_top_left=(-1, 0)), r"crops_coords_top_left=\[-1, 0\] is not allowed"),
    "refiner not served": (dict(high_noise_frac=0.8), "write the repository with --refiner"),
    "aesthetic score out of range": (dict(aesthetic_score=11.0), "aesthetic_score=11.0 is not allowed"),
    "prompt_2 count": (dict(prompt=["a", "b", "c"], prompt_2=["x", "y"]), "prompt_2 has 2 entries for 3 prompts"),
    "clip_skip past the layers": (dict(clip_skip=1), r"clip_skip=1 is not allowed: use an integer in \[0, 0\]"),
}


@pytest.mark.parametrize("case", SDXL_REFUSED)
def test_bad_sdxl_inputs_are_refused_by_name(case, tiny_sdxl):
    options, message = SDXL_REFUSED[case]
    pipeline = StableDiffusion(PipelineComponents(tiny_sdxl), lambda *a, **k: None)
    with pytest.raises(InvalidRequest, match=message):
        pipeline.check(GenerationRequest(**{"prompt": ["a cat"], **options}))


def test_tensorrt_profiles_of_sdxl_come_from_the_specs(tiny_sdxl, tiny_refiner, tmp_path):
    """trtexec's shapes for SDXL's UNet carry the added conditions, the refiner's its own sizes."""
    from utils.repository.engines import trtexec_command

    base, refiner = (specs.ModelDims.from_pretrained(folder) for folder in (tiny_sdxl, tiny_refiner))
    unet = " ".join(trtexec_command(families.UNET_XL, base, tmp_path))
    assert f"text_embeds:16x{base.pooled_dim},time_ids:16x6" in unet
    assert f"encoder_hidden_states:16x{3 * base.text_length}x{base.text_hidden + base.text_hidden_2}" in unet
    refined = " ".join(trtexec_command(families.REFINER_UNET, refiner, tmp_path))
    assert f"encoder_hidden_states:2x{refiner.text_length}x{refiner.text_hidden_2}" in refined
    assert "time_ids:2x5" in refined and "refiner_unet/2/model.plan" in refined
    second = " ".join(trtexec_command(families.TEXT_ENCODER_2, base, tmp_path))
    assert "input_ids:64x77" in second and "text_encoder_2/2/model.plan" in second


FAMILY_REFUSALS = {  # deployment options, model (or the refiner as it): what the message must say
    "the refiner as the model": (dict(), "refiner", "pass the base as --model and the refiner as --refiner"),
    "a refiner beside SD1.5": (dict(refiner="tiny-sdxl-refiner"), "sd", "an SDXL refiner refines an SDXL base"),
    "LoRA with SDXL": (dict(adapters=("style",)), "sdxl", "LoRA adapters and ControlNets serve SD1.x checkpoints"),
}


@pytest.mark.parametrize("case", FAMILY_REFUSALS)
def test_what_a_family_cannot_serve_is_refused_before_anything_is_written(case, tiny_sdxl, tiny_refiner, tiny_model,
                                                                         tmp_path):
    from utils.deployment import Deployment
    from utils.errors import UserError
    from utils.lora import LoraAdapter
    from utils.repository.writer import write_repository

    options, model, message = FAMILY_REFUSALS[case]
    if "adapters" in options:
        options = {"adapters": (LoraAdapter("style", "tiny"),)}
    model_dir = {"refiner": tiny_refiner, "sd": tiny_model, "sdxl": tiny_sdxl}[model]
    with pytest.raises(UserError, match=message):
        write_repository(tmp_path / "repository", model_dir, {}, Deployment(**options), models_dir=tiny_sdxl.parent)
    assert not (tmp_path / "repository").exists()


@pytest.mark.parametrize("name", ["encode_prompt", "ensemble_text_to_image", "ensemble_image_to_image",
                                  "refiner_encode_prompt", "text_to_latents", "refine_latents",
                                  "ensemble_text_to_image_refined"])
def test_sdxl_ensembles_connect(name):
    """SDXL's ensembles (utils/sdxl_ensembles.py), base then refiner's among them, as the repository
    step writes them: each step's maps name tensors its model has, every tensor read was made before,
    every input feeds a step."""
    from utils import sdxl_ensembles
    from utils.repository import configs

    steps, graphs = sdxl_ensembles.ensembles_of("sdxl", refiner=True)
    models = {**families.SDXL.networks, **{step.name: step for step in (*specs.BLS_PIPELINES, *steps)}, **graphs}
    config = configs.ensemble_config(graphs[name])
    available, consumed = {t.name for t in config.input}, set()
    for step in config.ensemble_scheduling.step:
        model = models[step.model_name]
        assert set(step.input_map) <= {t.name for t in model.inputs}, step.model_name
        assert set(step.output_map) <= {t.name for t in model.outputs}, step.model_name
        assert {t.name for t in model.inputs if not t.optional} <= set(step.input_map), step.model_name
        assert set(step.input_map.values()) <= available, (step.model_name, "reads a tensor nothing made yet")
        consumed |= set(step.input_map.values())
        available |= set(step.output_map.values())
    assert {t.name for t in config.input} <= consumed and {t.name for t in config.output} <= available


def test_base_then_refiners_models_are_committed_apart_as_generated():
    """Base then refiner's steps and ensembles are committed in triton/refiner_models, each config
    as the specs generate it, beside none of triton/models (whose every model a server loads)."""
    from utils import sdxl_ensembles
    from utils.layout import CONFIG_FILE, PROJECT_MODELS, REFINER_MODELS
    from utils.repository import configs

    names = [*(step.name for step in sdxl_ensembles.REFINER_STEPS), *sdxl_ensembles.REFINER_ENSEMBLES]
    assert sorted(path.name for path in REFINER_MODELS.iterdir()) == sorted(names)
    for name in names:
        assert configs.committed_folder(name) == REFINER_MODELS / name and not (PROJECT_MODELS / name).exists()
        committed = (REFINER_MODELS / name / CONFIG_FILE).read_text()
        assert committed == configs.to_pbtxt(configs.committed_config(name)), "run scripts/write_pipeline_configs.py"
        assert (REFINER_MODELS / name / "1" / "model.py").exists() == (name not in sdxl_ensembles.REFINER_ENSEMBLES)



def test_previews_use_each_familys_latent_colours():
    """A streaming preview maps latents to RGB by the family's own fit (SDXL's VAE is not SD1.5's):
    zero latents are SD1.5's grey and SDXL's bias colour; the refiner shares SDXL's VAE."""
    from pipelines.previews import preview

    zeros = torch.zeros(1, 4, 2, 2)
    assert preview(zeros, "sd")[0, 0, 0].tolist() == [128, 128, 128]
    assert preview(zeros, "sdxl")[0, 0, 0].tolist() == [141, 125, 127]
    assert torch.equal(preview(zeros, "sdxl-refiner"), preview(zeros, "sdxl"))
