"""SDXL served: the tiny SDXL base and its refiner, exported to ONNX and served by the portable
backend (one server for this module), each way against diffusers' SDXL pipelines: text to image,
image to image, and base then refiner (by BLS, client-side, and as the ensemble of ensembles
ensemble_text_to_image_refined); what each ensemble refuses of base then refiner, by name; previews;
and the SDXL tour of the quickstart as a user runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import report
from test_sdxl import GUIDANCE, MAX_PIXEL_DIFFERENCE, diffusers_sdxl, photo, pictures  # noqa: F401 (a fixture)
from tritonclient.utils import InferenceServerException

from utils import families, specs
from utils.export import export_network
from utils.sdxl_ensembles import ENSEMBLE_TEXT_TO_IMAGE_REFINED

pytestmark = pytest.mark.server  # starts tritonserver


@pytest.fixture(scope="module")
def sdxl_server(tiny_sdxl, tiny_refiner, tmp_path_factory):
    from utils.deployment import Deployment
    from utils.export import served_onnx_files
    from utils.repository.writer import write_repository
    from utils.server import TritonServer

    onnx_dir, models_dir = tmp_path_factory.mktemp("sdxl-onnx"), tiny_sdxl.parent
    files = served_onnx_files(onnx_dir, "tiny-sdxl", tiny_sdxl, (), models_dir, refiner="tiny-sdxl-refiner")
    for name, path in files.items():
        source = tiny_refiner if name == families.REFINER_UNET.name else tiny_sdxl
        export_network(specs.served_network(name, families.SDXL), source, path)
    repository = tmp_path_factory.mktemp("sdxl-repository")
    write_repository(repository, tiny_sdxl, files, Deployment(refiner="tiny-sdxl-refiner"), models_dir=models_dir)
    server = TritonServer(repository).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sdxl_ways(sdxl_server, tiny_sdxl, tiny_refiner):
    from pipelines.bls import BlsPipeline
    from pipelines.client_side import ClientSidePipeline
    from pipelines.ensemble import EnsemblePipeline

    client_side = ClientSidePipeline(tiny_sdxl, sdxl_server.grpc_url, refiner=tiny_refiner)
    return {"client-side": lambda *args, **options: client_side(*args, progress=False, **options),
            "BLS": BlsPipeline(sdxl_server.grpc_url), "ensemble": EnsemblePipeline(sdxl_server.grpc_url)}


@pytest.fixture(scope="module")
def sdxl_with_unet(tiny_sdxl, tmp_path_factory):
    """The torch runtime with --pipeline-loop with-unet: each model that runs the base's loop holds
    the base's UNet (two loops in flight), the refiner's served as refiner_unet."""
    from utils.deployment import Deployment, Placement
    from utils.repository.writer import write_repository
    from utils.server import TritonServer

    repository = tmp_path_factory.mktemp("sdxl-with-unet")
    deployment = Deployment(runtime="torch", refiner="tiny-sdxl-refiner",
                            placement=Placement(pipeline_loop="with-unet", pipeline_instances=2))
    write_repository(repository, tiny_sdxl, None, deployment, models_dir=tiny_sdxl.parent)
    server = TritonServer(repository).start()
    yield server
    server.stop()


WITH_UNET = ", the base's UNet in the loop's process"
WAYS = ["client-side", "BLS", "ensemble", f"BLS{WITH_UNET}", f"ensemble{WITH_UNET}"]


@pytest.mark.parametrize("way", WAYS)
def test_served_sdxl_equals_diffusers(way, request, diffusers_sdxl):  # noqa: F811 (the fixture)
    """Text to image, image to image and base + refiner, each way, against diffusers' SDXL pipelines
    (the ensembles' base + refiner: ensemble_text_to_image_refined, an ensemble of ensembles); BLS
    and the ensembles also with --pipeline-loop with-unet on the torch runtime. Text to image sends
    no guidance scale: the served family's default is diffusers' SDXL pipeline's."""
    from PIL import Image

    from pipelines.bls import BlsPipeline
    from pipelines.ensemble import EnsemblePipeline

    if WITH_UNET in way:
        url = request.getfixturevalue("sdxl_with_unet").grpc_url
        generate = BlsPipeline(url) if way.startswith("BLS") else EnsemblePipeline(url)
    else:
        generate = request.getfixturevalue("sdxl_ways")[way]
    options = dict(num_inference_steps=5, guidance_scale=GUIDANCE)
    generator = torch.Generator().manual_seed(7)
    latents = diffusers_sdxl["base"](prompt="a red door", denoising_end=0.8, output_type="latent",
                                     generator=generator, **options).images
    cases = {
        "text to image": (generate("a red door", negative_prompt="blurry", seed=3, num_inference_steps=5),
                          diffusers_sdxl["base"](prompt="a red door", negative_prompt="blurry",
                                                 generator=torch.Generator().manual_seed(3), num_inference_steps=5)),
        "image to image": (generate("a red door", image=photo()[None], seed=5, **options),
                           diffusers_sdxl["image to image"](prompt="a red door", image=Image.fromarray(photo()),
                                                            generator=torch.Generator().manual_seed(5), **options)),
        "base + refiner": (generate("a red door", seed=7, high_noise_frac=0.8, **options),
                           diffusers_sdxl["refiner"](prompt="a red door", denoising_start=0.8, image=latents,
                                                     generator=generator, **options)),
    }
    for case, (ours, expected) in cases.items():
        expected = pictures(expected)
        difference = int(np.abs(ours.astype(int) - expected.astype(int)).max())
        report(f"SDXL {case} {way} vs diffusers: max pixel difference {difference} (allowed {MAX_PIXEL_DIFFERENCE})")
        assert ours.shape == expected.shape and difference <= MAX_PIXEL_DIFFERENCE, case


def test_with_unet_the_loop_runs_the_bases_steps_itself_and_the_refiners_by_bls(sdxl_with_unet):
    """One request of base then refiner, 10 Euler steps at high_noise_frac 0.8, through the BLS
    pipeline with --pipeline-loop with-unet: its 8 base steps ran on the loop model's own UNet (the
    served unet did not run; its warm-up at load is the one execution it has), its 2 refiner steps on
    the served refiner_unet; the metrics count all 10."""
    import tritonclient.grpc as grpcclient
    from test_metrics import scrape, value

    from pipelines.bls import BlsPipeline
    from utils import metrics

    client = grpcclient.InferenceServerClient(sdxl_with_unet.grpc_url)

    def executions(model: str) -> int:
        statistics = client.get_inference_statistics(model, headers=sdxl_with_unet.admin_headers(), as_json=True)
        return int(statistics["model_stats"][0].get("execution_count", 0))

    unets = (specs.UNET.name, families.REFINER_UNET.name)
    steps, before = value(scrape(sdxl_with_unet), metrics.STEPS.name, model=specs.TEXT_TO_IMAGE.name), \
        [executions(unet) for unet in unets]
    BlsPipeline(sdxl_with_unet.grpc_url)("a red door", num_inference_steps=10, high_noise_frac=0.8, seed=1,
                                         guidance_scale=GUIDANCE)
    assert value(scrape(sdxl_with_unet), metrics.STEPS.name, model=specs.TEXT_TO_IMAGE.name) - steps == 10
    assert [executions(unet) - count for unet, count in zip(unets, before)] == [0, 2]  # (unet, refiner_unet)


def test_the_refined_ensemble_equals_bls_with_a_second_prompt_and_two_images(sdxl_ways):
    """Base then refiner's ensemble of ensembles with what its steps pass on besides the prompt:
    prompt_2 (the base's second text encoder only), a negative prompt, two images per prompt, the
    refiner's aesthetic scores; the same images as the BLS pipeline's."""
    options = dict(prompt="a red door", prompt_2="an oil painting", negative_prompt="blurry", num_images_per_prompt=2,
                   aesthetic_score=7.0, negative_aesthetic_score=2.0, high_noise_frac=0.6, num_inference_steps=6,
                   guidance_scale=GUIDANCE, seed=11)
    ensemble, bls = sdxl_ways["ensemble"](**options), sdxl_ways["BLS"](**options)
    difference = int(np.abs(ensemble.astype(int) - bls.astype(int)).max())
    report(f"SDXL base + refiner, prompt_2 and 2 images: ensemble vs BLS: max pixel difference {difference}")
    assert ensemble.shape == (2, *bls.shape[1:]) and difference == 0


REFINED_REFUSALS = {  # the ensemble, the request's options: what the message must say
    "the base's ensemble, given high_noise_frac": (
        "ensemble_text_to_image", dict(high_noise_frac=0.8),
        "this ensemble runs SDXL's base alone; send the request to ensemble_text_to_image_refined"),
    "image to image's, given high_noise_frac": (
        "ensemble_image_to_image", dict(high_noise_frac=0.8, image=photo()[None]),
        "send the request to ensemble_text_to_image_refined .*, to pipeline_image_to_image \\(BLS\\) for image"),
    "base then refiner's, without high_noise_frac": (
        "ensemble_text_to_image_refined", dict(), "high_noise_frac is required: send a FP32 tensor of shape \\[1\\]"),
    "base then refiner's, high_noise_frac out of range": (
        "ensemble_text_to_image_refined", dict(high_noise_frac=1.5), "high_noise_frac=1.5 is not allowed"),
}


@pytest.mark.parametrize("case", REFINED_REFUSALS)
def test_each_ensemble_refuses_what_it_cannot_do_of_base_then_refiner_by_name(case, sdxl_server, sdxl_ways):
    """Sent to each ensemble as it is, the request is refused by its first step, and the server serves on."""
    from utils import sdxl_ensembles
    from utils.request import GenerationRequest, request_to_arrays

    name, options, message = REFINED_REFUSALS[case]
    spec = (sdxl_ensembles.ENSEMBLES | sdxl_ensembles.REFINER_ENSEMBLES)[name]
    arrays = request_to_arrays(GenerationRequest(prompt="a red door", num_inference_steps=2, seed=0, **options), spec)
    with pytest.raises(InferenceServerException, match=message):
        sdxl_ways["ensemble"].infer(arrays, spec)
    assert sdxl_ways["ensemble"]("a red door", num_inference_steps=2, seed=0, high_noise_frac=0.5).shape[0] == 1


def test_an_sdxl_server_answers_its_canary_through_every_pipeline(sdxl_server):
    """The supervisor's canary: a generation through each pipeline the repository serves, base then
    refiner's ensemble among them."""
    from utils.server.health import canary, served_pipelines

    served = served_pipelines(sdxl_server.model_repository)
    assert ENSEMBLE_TEXT_TO_IMAGE_REFINED in served
    canary(sdxl_server.grpc_url, networks=[*families.SDXL.networks, families.REFINER_UNET.name], pipelines=served)


def test_an_sd15_server_refuses_an_sdxl_input_and_keeps_serving(triton_server):
    """A request with an SDXL input, to the session's SD1.5 server: a clear error by name, and the server serves on."""
    from pipelines.bls import BlsPipeline

    bls = BlsPipeline(triton_server.grpc_url)
    with pytest.raises(InferenceServerException, match="prompt_2 is an SDXL input: this deployment serves an SD1.x"):
        bls("a cat", prompt_2="a dog", num_inference_steps=2, seed=0)
    assert bls("a cat", num_inference_steps=2, seed=0).shape[0] == 1


@pytest.mark.slow
def test_the_demo_runs_the_tiny_sdxl_end_to_end(tmp_path):
    """`make demo MODEL=tiny-sdxl`: the quickstart's SDXL tour, as a user runs it in a fresh clone,
    whose triton/models holds the committed SD1.x pipeline models: it writes a repository of its own
    and leaves those untouched."""
    import filecmp
    import shutil
    import subprocess
    import sys

    from utils.layout import DEFAULT_REPOSITORY, PROJECT_MODELS, PROJECT_ROOT, SDXL_REPOSITORY

    shutil.copytree(PROJECT_MODELS, tmp_path / DEFAULT_REPOSITORY)
    committed = sorted(str(path.relative_to(tmp_path)) for path in (tmp_path / DEFAULT_REPOSITORY).rglob("*"))
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts/quickstart.py"), "--model", "tiny-sdxl",
                           "--num-inference-steps", "10"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max pixel difference between the two images: 0" in done.stdout  # client-side and BLS: the same loop
    outputs = sorted(path.name for path in (tmp_path / "outputs").iterdir())
    assert outputs == ["sdxl_bls.png", "sdxl_client_side.png", "sdxl_ensemble.png", "sdxl_image_to_image.png",
                       "sdxl_refined.png"]
    assert "max pixel difference to the BLS image: 0" in done.stdout  # the ensemble: the same loop too
    assert "max pixel difference to the BLS pipeline's: 0" in done.stdout  # base then refiner's ensemble too
    assert (tmp_path / SDXL_REPOSITORY / "text_encoder_2" / "config.pbtxt").exists()
    assert sorted(str(path.relative_to(tmp_path)) for path in (tmp_path / DEFAULT_REPOSITORY).rglob("*")) == committed
    assert not filecmp.dircmp(PROJECT_MODELS / "tokenizer", tmp_path / DEFAULT_REPOSITORY / "tokenizer").diff_files



def test_sdxl_streams_previews_then_the_bls_image(sdxl_server, sdxl_ways):
    """The streaming pipeline runs SDXL's loop too: previews every 2 steps, then the BLS pipeline's image."""
    from pipelines.streaming import StreamingPipeline

    options = dict(prompt="a red door", num_inference_steps=4, guidance_scale=GUIDANCE, seed=3)
    received = list(StreamingPipeline(sdxl_server.grpc_url).stream(preview_every=2, **options))
    assert [progress.final for progress in received] == [False, True]
    assert received[0].images.shape == (1, 8, 8, 3)  # the latents' size
    assert np.array_equal(received[-1].images, sdxl_ways["BLS"](**options))
