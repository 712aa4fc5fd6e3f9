"""Images from the real Triton server equal diffusers' images for the same model and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import profiled_server, report
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from pipelines.client_side import ClientSidePipeline
from pipelines.ensemble import EnsemblePipeline
from utils.request import SCHEDULERS

pytestmark = pytest.mark.server  # starts tritonserver

MAX_PIXEL_DIFFERENCE = 2  # on 0-255: the ONNX graphs and batched calls differ from torch by ~1e-6
CASES = {
    "one prompt": dict(prompt="a photo of an astronaut riding a horse on mars", seed=7,
                       num_inference_steps=20, guidance_scale=7.5),
    "two prompts, negative prompts": dict(prompt=["a red cube", "a blue sphere"],
                                          negative_prompt=["blurry", "low quality"], seed=123,
                                          num_inference_steps=12, guidance_scale=5.0),
    "no guidance": dict(prompt="a lighthouse", seed=3, num_inference_steps=10, guidance_scale=1.0),
}


@pytest.fixture(scope="module")
def diffusers_pipeline(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def diffusers_images(pipeline, prompt, seed, **options) -> np.ndarray:
    output = pipeline(prompt, generator=torch.Generator().manual_seed(seed), output_type="pil", **options)
    return np.stack([np.asarray(image) for image in output.images])


@pytest.fixture(scope="module")
def client_side(tiny_model, triton_server):
    return ClientSidePipeline(tiny_model, triton_server.grpc_url)


@pytest.fixture(scope="module")
def bls(triton_server):
    return BlsPipeline(triton_server.grpc_url)


@pytest.fixture(scope="module")
def ensemble(triton_server):
    return EnsemblePipeline(triton_server.grpc_url)


@pytest.fixture(scope="module")
def ways(client_side, bls, ensemble):
    """Each way to compose the pipeline, as a function of the request's options."""
    return {"client-side": lambda **options: client_side(progress=False, **options), "BLS": bls, "ensemble": ensemble}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["client-side", "BLS", "ensemble"])
def test_triton_image_equals_diffusers(kind, case, ways, diffusers_pipeline):
    options = CASES[case]
    images = ways[kind](**options)
    expected = diffusers_images(diffusers_pipeline, **options)
    assert images.dtype == np.uint8 and images.shape == expected.shape
    assert expected.std() > 5, "the reference image is flat: the comparison would prove nothing"
    difference = int(np.abs(images.astype(int) - expected.astype(int)).max())
    report(f"{kind:<12} vs diffusers, {case}: max pixel difference {difference} (allowed {MAX_PIXEL_DIFFERENCE})")
    assert difference <= MAX_PIXEL_DIFFERENCE


# What a request may choose (utils/request.py), each against diffusers given the same choice.
OPTION_CASES = {
    **{f"scheduler {name}": dict(prompt="a red barn in the snow", seed=4, num_inference_steps=8, scheduler=name)
       for name in SCHEDULERS},
    "non-square 48x96": dict(prompt="a wide valley", seed=6, num_inference_steps=8, height=48, width=96),
    # 11x7 latents: odd sizes, which the UNet's up-sampling follows from its skip connections.
    "non-square 88x56": dict(prompt="a tall tower", seed=10, num_inference_steps=8, height=88, width=56),
    "2 prompts x num_images_per_prompt=2": dict(prompt=["a cat", "a dog"], seed=8, num_inference_steps=6,
                                                num_images_per_prompt=2, guidance_scale=6.0),
    "few steps: LCMScheduler, 4 steps, guidance 1.5": dict(prompt="a paper boat", seed=9, num_inference_steps=4,
                                                           scheduler="LCMScheduler", guidance_scale=1.5),
    # diffusers' callback keeps the last row of the embeddings: one prompt, one image.
    "guidance cut off after 40 % of the steps": dict(prompt="a glass of water", seed=11, num_inference_steps=10,
                                                     cfg_cutoff_step_ratio=0.4),
}


def diffusers_options(options: dict) -> dict:
    """The request's options as diffusers takes them: the guidance cut-off as its callback."""
    from diffusers.callbacks import SDCFGCutoffCallback

    options = dict(options)
    ratio = options.pop("cfg_cutoff_step_ratio", None)
    if ratio is not None:
        options["callback_on_step_end"] = SDCFGCutoffCallback(cutoff_step_ratio=ratio)
    return options


def with_scheduler(pipeline, scheduler: str | None, kind=None):
    """The diffusers pipeline (or its ``kind``, e.g. img2img) with the request's scheduler, built
    from the checkpoint's scheduler config as the served pipelines build it."""
    import diffusers

    components = dict(pipeline.components)
    if scheduler is not None:
        components["scheduler"] = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    made = (kind or type(pipeline))(**components)
    made.set_progress_bar_config(disable=True)
    return made


@pytest.mark.parametrize("case", OPTION_CASES)
@pytest.mark.parametrize("kind", ["client-side", "BLS", "ensemble"])
def test_request_options_equal_diffusers(kind, case, ways, diffusers_pipeline):
    options = dict(OPTION_CASES[case])
    images = ways[kind](**options)
    reference = with_scheduler(diffusers_pipeline, options.pop("scheduler", None))
    expected = diffusers_images(reference, **diffusers_options(options))
    prompts = options["prompt"] if isinstance(options["prompt"], list) else [options["prompt"]]
    height, width = options.get("height", 64), options.get("width", 64)
    assert images.shape == expected.shape == (len(prompts) * options.get("num_images_per_prompt", 1), height, width, 3)
    assert expected.std() > 5, "the reference image is flat: the comparison would prove nothing"
    difference = int(np.abs(images.astype(int) - expected.astype(int)).max())
    report(f"{kind:<12} vs diffusers, {case}: max pixel difference {difference} (allowed {MAX_PIXEL_DIFFERENCE})")
    assert difference <= MAX_PIXEL_DIFFERENCE


IMAGE_TO_IMAGE_CASES = {
    "one prompt, strength 0.8": dict(prompt="a castle in the clouds", seed=5, num_inference_steps=12, strength=0.8),
    "two prompts, one image for both, negative prompt, strength 0.5": dict(
        prompt=["a red cube", "a blue sphere"], negative_prompt="blurry", seed=9, num_inference_steps=10,
        strength=0.5, guidance_scale=6.0, images=1),
    "two images, no guidance, strength 1": dict(prompt=["a lake", "a forest"], seed=2, num_inference_steps=6,
                                                strength=1.0, guidance_scale=1.0, images=2),
    "non-square 56x80 image, Euler ancestral, 2 images per prompt": dict(
        prompt="a harbour at dusk", seed=12, num_inference_steps=8, strength=0.7, size=(56, 80),
        scheduler="EulerAncestralDiscreteScheduler", num_images_per_prompt=2),
    "LCMScheduler, guidance cut off after half the steps, strength 0.75": dict(
        prompt="a windmill", seed=14, num_inference_steps=8, strength=0.75, scheduler="LCMScheduler",
        cfg_cutoff_step_ratio=0.5),
}


def init_images(count: int, tiny_model, size: tuple[int, int] | None = None) -> np.ndarray:
    """Deterministic pictures (at the model's size, or ``size``): smooth gradients with a pattern."""
    from utils.specs import ModelDims

    dims = ModelDims.from_pretrained(tiny_model)
    height, width = size or (dims.image_height, dims.image_width)
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x * 4 + 40 * i) % 256, (y * 4) % 256, ((x + y) * 2 + 90 * i) % 256], -1)
                     for i in range(count)]).astype(np.uint8)


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts")  # diffusers on one image for two prompts
@pytest.mark.parametrize("case", IMAGE_TO_IMAGE_CASES)
@pytest.mark.parametrize("kind", ["client-side", "BLS", "ensemble"])
def test_image_to_image_equals_diffusers(kind, case, ways, diffusers_pipeline, tiny_model):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    options = dict(IMAGE_TO_IMAGE_CASES[case])
    images = init_images(options.pop("images", 1), tiny_model, options.pop("size", None))
    prompts = options["prompt"] if isinstance(options["prompt"], list) else [options["prompt"]]
    served = ways[kind](image=images, **options)
    img2img = with_scheduler(diffusers_pipeline, options.pop("scheduler", None), StableDiffusionImg2ImgPipeline)
    negative = options.pop("negative_prompt", None)
    expected = np.stack([np.asarray(image) for image in img2img(
        image=[Image.fromarray(image) for image in images], generator=torch.Generator().manual_seed(options.pop("seed")),
        negative_prompt=[negative] * len(prompts) if negative else None, output_type="pil",
        **diffusers_options(options)).images])
    count = len(prompts) * options.get("num_images_per_prompt", 1)
    assert served.shape == expected.shape == (count, *images.shape[1:])
    difference = int(np.abs(served.astype(int) - expected.astype(int)).max())
    report(f"{kind:<12} image to image vs diffusers, {case}: max pixel difference {difference} "
           f"(allowed {MAX_PIXEL_DIFFERENCE})")
    assert difference <= MAX_PIXEL_DIFFERENCE


def test_same_seed_same_image_and_other_seed_other_image(bls):
    first = bls("a cat", seed=42, num_inference_steps=5)
    assert np.array_equal(first, bls("a cat", seed=42, num_inference_steps=5))
    assert not np.array_equal(first, bls("a cat", seed=43, num_inference_steps=5))


def test_client_side_and_bls_agree(client_side, bls):
    options = dict(prompt="a watercolor fox", seed=11, num_inference_steps=8)
    difference = np.abs(client_side(progress=False, **options).astype(int) - bls(**options)).max()
    assert difference <= MAX_PIXEL_DIFFERENCE


def test_client_side_rejects_bad_input_before_calling_the_server(client_side):
    with pytest.raises(ValueError, match=r"num_inference_steps=0 .* \[1, 999\]"):
        client_side("a cat", num_inference_steps=0, progress=False)


def test_bls_image_shape_follows_the_model(bls, tiny_model):
    from utils.specs import ModelDims

    dims = ModelDims.from_pretrained(tiny_model)
    images = bls(["a", "b"], num_inference_steps=2, seed=1)
    assert images.shape == (2, dims.image_height, dims.image_width, 3)


def test_unknown_model_name_is_a_clear_client_error(triton_server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    with pytest.raises(InferenceServerException, match="unknown model|not found"):
        client.get_model_config("no_such_model")


TORCH_CONTROLNET = "edges"  # the torch runtime's ControlNet: the tiny one of this name


@pytest.fixture(scope="module")
def torch_runtime_server(tiny_model, models_dir, tmp_path_factory):
    """The python backend's torch runtime (the GPU runtime), here on the CPU: same models, same
    clients; only the CUDA graphs need a GPU (exercised by scripts/gpu_host/benchmark.sh). With a
    ControlNet, which it loads from the checkpoint's copy beside the UNet."""
    from utils.controlnet import ServedControlNet
    from utils.deployment import Deployment
    from utils.repository.writer import write_repository

    repository = tmp_path_factory.mktemp("torch-runtime")
    write_repository(repository, tiny_model, None, Deployment(runtime="torch", ensembles=False, controlnets=(
        ServedControlNet(TORCH_CONTROLNET, "tiny"),)), models_dir=models_dir)
    with profiled_server(repository) as server:  # the models log their split
        yield server


@pytest.mark.parametrize("case", ["two prompts, negative prompts", "non-square 88x56"])
def test_torch_runtime_images_equal_diffusers(case, torch_runtime_server, tiny_model, diffusers_pipeline):
    options = {**CASES, **OPTION_CASES}[case]
    expected = diffusers_images(diffusers_pipeline, **options)
    for images in (BlsPipeline(torch_runtime_server.grpc_url)(**options),
                   ClientSidePipeline(tiny_model, torch_runtime_server.grpc_url)(progress=False, **options)):
        difference = int(np.abs(images.astype(int) - expected.astype(int)).max())
        report(f"torch runtime vs diffusers, {case}: max pixel difference {difference}")
        assert difference <= MAX_PIXEL_DIFFERENCE


def test_torch_runtime_serves_a_controlnet_equal_to_diffusers(torch_runtime_server, tiny_model, models_dir):
    from test_controlnet import diffusers_controlnet, photo

    from utils.controlnet import ServedControlNet, canny, controlnet_folder

    options = dict(prompt="a red door", seed=4, num_inference_steps=6)
    images = BlsPipeline(torch_runtime_server.grpc_url)(control_image=photo(), control_mode=["canny"], **options)
    folder = controlnet_folder(ServedControlNet(TORCH_CONTROLNET, "tiny"), tiny_model, models_dir)
    expected = diffusers_controlnet(tiny_model, [folder], canny(photo()), **options)
    difference = int(np.abs(images.astype(int) - expected.astype(int)).max())
    report(f"torch runtime ControlNet vs diffusers: max pixel difference {difference}")
    assert difference <= MAX_PIXEL_DIFFERENCE


def test_torch_runtime_batches_concurrent_requests(torch_runtime_server):
    """Dynamic batching: requests queued together run as one batch, and each gets its own rows
    back (equal, to rounding, to running it alone: a batch of another size may use other kernels)."""
    import queue

    import tritonclient.grpc as grpcclient

    from utils.server.health import probe_inputs

    client = grpcclient.InferenceServerClient(torch_runtime_server.grpc_url)
    config = client.get_model_config("unet", as_json=True)["config"]
    requests = [probe_inputs(config, 1, seed=seed) for seed in range(16)]
    alone = [client.infer("unet", inputs).as_numpy("outputs") for inputs in requests]
    headers = torch_runtime_server.admin_headers()  # the statistics API needs the admin key
    before = client.get_inference_statistics("unet", headers=headers, as_json=True)["model_stats"][0]
    done = queue.Queue()
    for index, inputs in enumerate(requests):  # all at once: they queue while the model is busy
        client.async_infer("unet", inputs, callback=lambda result, error, index=index: done.put((index, result, error)))
    results = dict((index, (result, error)) for index, result, error in (done.get(timeout=60) for _ in requests))
    after = client.get_inference_statistics("unet", headers=headers, as_json=True)["model_stats"][0]
    for index, (result, error) in results.items():
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("outputs"), alone[index], atol=1e-4)
    executions = int(after["execution_count"]) - int(before["execution_count"])
    report(f"torch runtime: 16 concurrent UNet requests ran in {executions} executions")
    assert executions < len(requests)


def test_profiling_splits_a_networks_calls_and_a_pipelines_request(torch_runtime_server):
    """SD_TRITON_PROFILE_BLS=1: the BLS model logs each request's split, the torch runtime's UNet
    an average split of its calls every PROFILE_EVERY calls."""
    from utils.timing import PROFILE_EVERY

    BlsPipeline(torch_runtime_server.grpc_url)(prompt=["a red fox"], num_inference_steps=PROFILE_EVERY, seed=0)
    log = torch_runtime_server.log_file.read_text()
    unet = [line for line in log.splitlines() if f"unet: {PROFILE_EVERY} calls, per call" in line]
    assert unet and all(phase in unet[-1] for phase in ("inputs (DLPack, to the device)", "batch joined",
                                                         "network", "answers (DLPack)"))
    pipeline = [line for line in log.splitlines() if "pipeline_text_to_image: " in line and "loop and scheduler" in line]
    assert pipeline and "unet sub-requests" in pipeline[-1]
    report(f"profile: {unet[-1].split('] ', 1)[-1]}")


def test_torch_runtime_fails_a_bad_request_alone(torch_runtime_server):
    """One request with token ids past the vocabulary among good ones queued together: it fails
    with the network's name, the others are answered (each runs alone once their batch failed)."""
    import queue

    import tritonclient.grpc as grpcclient

    from utils.grpc_client import infer_inputs
    from utils.specs import TEXT_ENCODER

    client = grpcclient.InferenceServerClient(torch_runtime_server.grpc_url)
    ids, mask, skipped = client.get_model_config(TEXT_ENCODER.name, as_json=True)["config"]["input"]
    tokens = np.zeros((1, *map(int, ids["dims"])), np.int32)
    rest = {mask["name"]: np.ones_like(tokens), skipped["name"]: np.zeros((1, 1), np.int32)}
    requests = [infer_inputs({ids["name"]: tokens + (10**6 if index == 3 else index), **rest}) for index in range(8)]
    done = queue.Queue()
    for index, inputs in enumerate(requests):
        client.async_infer(TEXT_ENCODER.name, inputs,
                           callback=lambda result, error, index=index: done.put((index, result, error)))
    results = dict((index, (result, error)) for index, result, error in (done.get(timeout=60) for _ in requests))
    failed = {index: error for index, (_, error) in results.items() if error is not None}
    assert list(failed) == [3], failed
    assert TEXT_ENCODER.name in failed[3].message()
    statistics = client.get_inference_statistics(TEXT_ENCODER.name, headers=torch_runtime_server.admin_headers(),
                                                 as_json=True)
    executions = statistics["model_stats"][0]["execution_count"]
    report(f"torch runtime: a bad request among 8 queued together failed alone ({executions} executions so far)")


def test_client_side_pipeline_addresses_a_gpu_copy_by_its_served_name(triton_server, tiny_model):
    """gpu=0 asks for unet_gpu0, the name a repository on several GPUs serves (utils/layout.py);
    this server has no such copy, which the client says at once rather than retrying."""
    import time

    from utils.errors import UsageError

    start = time.monotonic()
    with pytest.raises(UsageError, match=r"does not serve 'unet_gpu0' .*--gpu N"):
        ClientSidePipeline(tiny_model, triton_server.grpc_url, gpu=0)
    assert time.monotonic() - start < 10
