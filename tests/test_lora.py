"""LoRA adapters: each served as a UNet of its own, chosen per request, equal to diffusers with the
same adapter; files that do not fit are refused before anything is written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ADAPTERS, TEXT_ENCODER_ADAPTER, report
from test_end_to_end import MAX_PIXEL_DIFFERENCE, diffusers_options, with_scheduler
from tritonclient.utils import InferenceServerException

from pipelines.bls import BlsPipeline
from pipelines.client_side import ClientSidePipeline
from pipelines.ensemble import EnsemblePipeline
from utils import specs
from utils.lora import AdapterError, LoraAdapter, adapter_file, build_tiny_adapter, fused_model, load_adapter
from utils.request import GenerationRequest, request_to_arrays

CASES = {
    "one adapter": dict(prompt="a red barn", seed=21, num_inference_steps=8, lora=["style"]),
    # LCM-LoRA's use: the LCM scheduler, 4 steps, no guidance.
    "LCM adapter, LCMScheduler, 4 steps, guidance 1": dict(prompt="a paper boat", seed=22, num_inference_steps=4,
                                                         scheduler="LCMScheduler", guidance_scale=1.0, lora=["lcm"]),
    "one adapter, guidance cut off after half the steps": dict(prompt="a glass of water", seed=23,
                                                                num_inference_steps=8, cfg_cutoff_step_ratio=0.5,
                                                                lora=["style"]),
}


@pytest.fixture(scope="module")
def diffusers_with_adapters(tiny_model, in_place_adapters):
    """diffusers' pipeline with the session's adapters loaded (and the one with a text encoder
    part), as a user of diffusers loads them."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    for adapter in in_place_adapters:
        pipeline.load_lora_weights(str(adapter.path), adapter_name=adapter.name)
    return pipeline


def diffusers_lora_images(pipeline, options: dict) -> np.ndarray:
    """diffusers with the request's adapters active at their weights (none: LoRA disabled)."""
    options = dict(options)
    names, scales = options.pop("lora", []), options.pop("lora_scale", None)
    if names:
        pipeline.enable_lora()
        pipeline.set_adapters(names, scales or [1.0] * len(names))
    else:
        pipeline.disable_lora()
    reference = with_scheduler(pipeline, options.pop("scheduler", None))
    seed = options.pop("seed")
    output = reference(generator=torch.Generator().manual_seed(seed), output_type="pil", **diffusers_options(options))
    return np.stack([np.asarray(image) for image in output.images])


def ways_of(tiny_model, url: str) -> dict:
    client_side = ClientSidePipeline(tiny_model, url)
    return {"client-side": lambda **options: client_side(progress=False, **options),
            "BLS": BlsPipeline(url), "ensemble": EnsemblePipeline(url)}


@pytest.fixture(scope="module")
def ways(tiny_model, triton_server):
    """Fused: the session server (the ONNX route), a UNet per adapter."""
    return ways_of(tiny_model, triton_server.grpc_url)


@pytest.fixture(scope="module")
def in_place_ways(tiny_model, in_place_adapters, models_dir, tmp_path_factory):
    """In place: the torch runtime's UNet and text encoder apply the adapters per request (here on
    the CPU)."""
    from utils.deployment import Deployment
    from utils.repository.writer import write_repository
    from utils.server import TritonServer

    repository = tmp_path_factory.mktemp("lora-in-place")
    write_repository(repository, tiny_model, None, Deployment(runtime="torch", adapters=in_place_adapters),
                     models_dir=models_dir)
    server = TritonServer(repository).start()
    yield ways_of(tiny_model, server.grpc_url)
    server.stop()


PLACEMENTS = ("fused", "in place")


def placement_ways(request, placement: str) -> dict:
    return request.getfixturevalue("ways" if placement == "fused" else "in_place_ways")


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# Only the torch runtime, which applies adapters in place, serves these.
IN_PLACE_CASES = {
    "two adapters mixed, weights 0.7 and 0.5": dict(prompt="a harbour", seed=25, num_inference_steps=8,
                                                   lora=["style", "lcm"], lora_scale=[0.7, 0.5]),
    "one adapter at weight 0.5": dict(prompt="a red barn", seed=21, num_inference_steps=8, lora=["style"],
                                      lora_scale=[0.5]),
    "an adapter with a text encoder part": dict(prompt="a stone bridge", seed=26, num_inference_steps=8,
                                                lora=[TEXT_ENCODER_ADAPTER]),
    "it mixed with a UNet-only one, weights 0.8 and 0.6": dict(prompt="a stone bridge", seed=27, num_inference_steps=8,
                                                               lora=[TEXT_ENCODER_ADAPTER, "style"],
                                                               lora_scale=[0.8, 0.6]),
}


def parity_cases():
    for placement in PLACEMENTS:
        for case in {**CASES, **(IN_PLACE_CASES if placement == "in place" else {})}:
            for kind in ("client-side", "BLS", "ensemble"):
                yield pytest.param(placement, case, kind, id=f"{placement}-{kind}-{case}")


@pytest.mark.server
@pytest.mark.parametrize("placement, case, kind", parity_cases())
def test_an_adapter_image_equals_diffusers_with_that_adapter(placement, case, kind, request, diffusers_with_adapters):
    options = {**CASES, **IN_PLACE_CASES}[case]
    images = placement_ways(request, placement)[kind](**options)
    expected = diffusers_lora_images(diffusers_with_adapters, options)
    base = diffusers_lora_images(diffusers_with_adapters, {**options, "lora": []})
    assert max_difference(expected, base) > 3 * MAX_PIXEL_DIFFERENCE, "the adapter changes nothing: the test would prove nothing"
    difference = max_difference(images, expected)
    report(f"{kind:<12} LoRA ({placement}) vs diffusers, {case}: max pixel difference {difference} "
           f"(allowed {MAX_PIXEL_DIFFERENCE})")
    assert difference <= MAX_PIXEL_DIFFERENCE


@pytest.mark.server
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("kind", ["client-side", "BLS", "ensemble"])
def test_adapters_switched_between_requests_leave_nothing_behind(kind, placement, request, diffusers_with_adapters):
    """A -> B -> none -> A: each image is its adapter's (A twice the same: in place, the weights
    come back exactly), none is the base image."""
    run = placement_ways(request, placement)[kind]
    request = dict(prompt="a lighthouse", seed=24, num_inference_steps=6)
    first_a, b, none, second_a = (run(**request, lora=lora) for lora in (["style"], ["lcm"], [], ["style"]))
    assert np.array_equal(first_a, second_a)
    assert max_difference(first_a, b) > 3 * MAX_PIXEL_DIFFERENCE
    for images, lora in ((b, ["lcm"]), (none, [])):
        assert max_difference(images, diffusers_lora_images(diffusers_with_adapters, {**request, "lora": lora})) \
            <= MAX_PIXEL_DIFFERENCE
    report(f"{kind:<12} LoRA ({placement}) A -> B -> none -> A: A unchanged, B and none equal diffusers")


@pytest.mark.server
def test_concurrent_requests_of_different_adapters_each_get_their_own(in_place_ways):
    """Requests of different adapters that reach the UNet together are never run in one batch with
    one set of weights: each image equals the same request made alone."""
    from concurrent.futures import ThreadPoolExecutor

    bls = in_place_ways["BLS"]
    requests = [dict(prompt="a tree", seed=30 + i, num_inference_steps=6, lora=lora)
                for i, lora in enumerate([["style"], ["lcm"], [], ["style", "lcm"]] * 2)]
    alone = [bls(**r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: bls(**r), requests))
    assert all(max_difference(a, b) <= MAX_PIXEL_DIFFERENCE for a, b in zip(alone, together))


GOOD = dict(prompt="a cat", num_inference_steps=2, seed=1)
BAD = {  # request fields -> the message's pattern
    "unknown adapter": (dict(lora=["anime"]), r"lora='anime' is not served: the adapters here are style, lcm"),
    "NaN weight": (dict(lora=["style"], lora_scale=[float("nan")]),
                   r"lora_scale\[0\]=nan \(for 'style'\) is not allowed: use a finite weight in \[-2, 2\]"),
    "infinite weight": (dict(lora=["style"], lora_scale=[float("inf")]), r"lora_scale\[0\]=inf .* finite weight"),
    "weight out of range": (dict(lora=["style"], lora_scale=[3.0]), r"lora_scale\[0\]=3.0 .* \[-2, 2\]"),
    "more weights than adapters": (dict(lora=["style"], lora_scale=[1.0, 1.0]),
                                   r"lora_scale=\[1.0, 1.0\] has 2 value\(s\) for 1 adapter\(s\)"),
    "a weight and no adapter": (dict(lora_scale=[1.0]), r"lora_scale=\[1.0\] has 1 value\(s\) for 0 adapter\(s\)"),
    "an adapter twice": (dict(lora=["style", "style"]), r"names an adapter twice"),
    "more adapters than allowed": (dict(lora=["a", "b", "c", "d", "e"]), r"names 5 adapters: at most 4"),
    "a name that is no name": (dict(lora=["../unet"]), r"lora\[0\]='../unet' is not an adapter name"),
    "two adapters, each fused alone": (dict(lora=["style", "lcm"]), r"one adapter per request"),
    "a weight other than the fused one": (dict(lora=["style"], lora_scale=[0.5]), r"fused at weight 1"),
}


@pytest.mark.server
@pytest.mark.parametrize("spec", [specs.TEXT_TO_IMAGE, specs.ENSEMBLE_TEXT_TO_IMAGE], ids=lambda spec: spec.name)
@pytest.mark.parametrize("case", BAD)
def test_a_bad_adapter_request_is_refused_by_name_and_the_server_keeps_serving(case, spec, ways):
    fields, message = BAD[case]
    arrays = request_to_arrays(GenerationRequest(**GOOD, **fields), specs.TEXT_TO_IMAGE)
    pipeline = ways["BLS" if spec is specs.TEXT_TO_IMAGE else "ensemble"]
    with pytest.raises(InferenceServerException) as caught:
        pipeline.infer(arrays, spec)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    assert re.search(message, caught.value.message()), caught.value.message()
    assert pipeline(**GOOD, lora=["style"]).shape == (1, 64, 64, 3)


@pytest.mark.server
def test_the_client_side_pipeline_refuses_an_adapter_the_server_does_not_serve(ways):
    from utils.request import InvalidRequest

    with pytest.raises(InvalidRequest, match=r"lora='anime' is not served: the server has no unet_anime"):
        ways["client-side"](**GOOD, lora=["anime"])


@pytest.mark.slow  # builds adapters or exports
def test_the_repository_serves_a_unet_per_adapter(repository):
    for name in ADAPTERS:
        assert (repository / f"unet_{name}" / "1" / "model.onnx").is_file()
    serving = (repository / specs.TEXT_TO_IMAGE.name / "1" / "serving.json").read_text()
    assert all(f'"{name}"' in serving for name in ADAPTERS)


@pytest.mark.slow  # builds adapters or exports
def test_a_changed_adapter_file_gets_a_new_fused_unet(tiny_model, tmp_path):
    """Fused checkpoints are named by the file's hash: nothing made before is overwritten."""
    path = build_tiny_adapter(tiny_model, tmp_path / "a.safetensors", seed=1)
    first = fused_model(tiny_model, LoraAdapter("a", path), tmp_path / "models")
    build_tiny_adapter(tiny_model, path, seed=2)
    second = fused_model(tiny_model, LoraAdapter("a", path), tmp_path / "models")
    assert first != second and first.is_dir() and second.is_dir()


def _unet(tiny_model):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")


@pytest.mark.slow  # builds adapters or exports
def test_files_that_do_not_fit_are_refused_naming_the_file(tiny_model, tmp_path, adapters):
    from safetensors.torch import load_file, save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match=r"garbage.safetensors: not a LoRA file diffusers can read"):
        load_adapter(_unet(tiny_model), "x", garbage)
    weights = load_file(str(adapters[0].path))
    renamed = {key.replace("attn1", "attn9"): value for key, value in weights.items()}
    save_file(renamed, str(tmp_path / "other.safetensors"))
    with pytest.raises(AdapterError, match=r"other.safetensors: targets '.*attn9.*', which this checkpoint's UNet does "
                                           r"not have"):
        load_adapter(_unet(tiny_model), "x", tmp_path / "other.safetensors")
    resized = {key: torch.zeros(value.shape[0], value.shape[1] + 1) if "down" in key or "lora_A" in key else value
               for key, value in weights.items()}
    save_file(resized, str(tmp_path / "resized.safetensors"))
    with pytest.raises(AdapterError, match=r"resized.safetensors: does not fit this checkpoint's UNet \(size mismatch"):
        load_adapter(_unet(tiny_model), "x", tmp_path / "resized.safetensors")
    text_encoder = {**weights, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight":
                    torch.zeros(4, 32)}
    save_file(text_encoder, str(tmp_path / "with-text-encoder.safetensors"))
    with pytest.raises(AdapterError, match=r"has text_encoder weights; the ONNX and TensorRT routes serve each "
                                           r"adapter fused into a UNet of its own.*--runtime torch"):
        load_adapter(_unet(tiny_model), "x", tmp_path / "with-text-encoder.safetensors")


@pytest.mark.slow  # builds adapters or exports
def test_a_bad_adapter_writes_nothing(tiny_model, tmp_path):
    from utils.deployment import Deployment
    from utils.repository.writer import write_repository

    with pytest.raises(AdapterError, match=r"--lora style=missing.safetensors: no such file"):
        write_repository(tmp_path / "repository", tiny_model, None,
                         Deployment(runtime="torch", adapters=(LoraAdapter("style", Path("missing.safetensors")),)),
                         models_dir=tmp_path / "models")
    assert not (tmp_path / "repository").exists()


@pytest.mark.parametrize("text, message", [
    ("style", r"give NAME=PATH"), ("Style=x.safetensors", r"lower-case letters, digits and dashes"),
    ("=x.safetensors", r"the name '' is served as unet_"),
])
def test_the_lora_flag_says_how_to_write_it(text, message):
    from utils.errors import UsageError

    with pytest.raises(UsageError, match=message):
        LoraAdapter.parse(text)


@pytest.mark.slow  # builds adapters or exports
def test_a_tiny_adapter_is_the_same_for_the_same_name(tiny_model, tmp_path):
    first = adapter_file(LoraAdapter("style", Path("tiny")), tiny_model, tmp_path / "a")
    second = adapter_file(LoraAdapter("style", Path("tiny")), tiny_model, tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.slow  # builds adapters
def test_in_place_adapters_reach_the_fused_projections_of_the_compile_recipe(tiny_model, adapters):
    """The GPU runtime's compile recipe fuses each attention's q, k and v into one projection (a
    new weight) before the adapters load: the changes must land there, or an adapter would change
    only its output projections. Each UNet output, mix and switch included, equals peft's unfused
    LoRA layers (diffusers' set_adapters) on a UNet with separate projections."""
    from utils.lora_in_place import InPlaceAdapters
    from utils.networks import load_network
    from utils.python_backend.cuda_graphs import compile_recipe

    files = {adapter.name: adapter.path for adapter in adapters}
    reference = _unet(tiny_model)
    for name, path in files.items():
        load_adapter(reference, name, path)
    network = load_network(specs.UNET.name, tiny_model, "FP32", "cpu")
    compile_recipe(network)
    fused = network.unet
    in_place = InPlaceAdapters(fused, files)
    assert any(getattr(module, "fused_projections", False) for module in fused.modules())
    dims = specs.ModelDims.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, dims.latent_channels, dims.latent_height, dims.latent_width), generator=generator)
    text = torch.randn((2, dims.text_length, dims.text_hidden), generator=generator)
    first, second = ADAPTERS
    with torch.no_grad():
        for adapters_set in (((first, 1.0),), ((second, 1.0),), ((first, 0.7), (second, 0.5)), (), ((first, 1.0),)):
            in_place.apply(adapters_set)
            if adapters_set:
                reference.enable_lora()
                reference.set_adapters([name for name, _ in adapters_set], [scale for _, scale in adapters_set])
            else:
                reference.disable_lora()
            expected = reference(latents, 500, encoder_hidden_states=text).sample
            served = fused(latents.contiguous(memory_format=torch.channels_last), 500, encoder_hidden_states=text).sample
            assert torch.allclose(served, expected, atol=1e-4), (adapters_set, float((served - expected).abs().max()))


@pytest.mark.slow  # builds adapters
def test_weights_that_did_not_load_are_refused(tiny_model, adapters):
    """diffusers only warns of LoRA keys it could not place (as with a peft other than the pinned
    one): the check that follows every load finds the layers without the file's weights."""
    from diffusers import StableDiffusionPipeline

    from utils.lora import check_loaded

    unet = _unet(tiny_model)
    load_adapter(unet, "x", adapters[0].path)
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(adapters[0].path))
    check_loaded(unet, "x", state_dict, adapters[0].path)  # as loaded: passes
    doubled = {key: 2 * value for key, value in state_dict.items()}
    with pytest.raises(AdapterError, match=r"its weights did not load into the network's LoRA layers .* install the "
                                           r"versions requirements.txt pins"):
        check_loaded(unet, "x", doubled, adapters[0].path)


@pytest.mark.server
def test_an_ensemble_request_without_the_adapters_parameter_is_refused_in_place(in_place_ways):
    """In place, an ensemble's text encoder step reads the adapters from the request parameter
    (Triton hands a request's parameters to every step): a request that names adapters in its
    inputs only is refused by the first step, saying what to send."""
    request = GenerationRequest(prompt=["a kite"], num_inference_steps=2, seed=0, lora=[TEXT_ENCODER_ADAPTER])
    arrays = request_to_arrays(request, specs.ENSEMBLE_TEXT_TO_IMAGE)
    with pytest.raises(InferenceServerException, match=r"INVALID_ARG.*the text encoder applies adapters in place.*"
                                                       r"send parameters=\{'lora': 'words:1.0'\}"):
        in_place_ways["ensemble"].infer(arrays, specs.ENSEMBLE_TEXT_TO_IMAGE)
    plain = request_to_arrays(GenerationRequest(prompt=["a kite"], num_inference_steps=2, seed=0),
                              specs.ENSEMBLE_TEXT_TO_IMAGE)
    for parameter in ("words:1.0", "words"):  # an adapter for the text encoder alone, or not even that
        with pytest.raises(InferenceServerException, match=r"INVALID_ARG.*leave the parameter out, or name the "
                                                           r"adapters in the inputs too"):
            in_place_ways["ensemble"].infer(plain, specs.ENSEMBLE_TEXT_TO_IMAGE, {"lora": parameter})
    images = in_place_ways["ensemble"].infer(arrays, specs.ENSEMBLE_TEXT_TO_IMAGE, {"lora": "words:1.0"})
    assert images.shape[0] == 1


@pytest.mark.server
def test_a_network_asked_for_an_adapter_it_does_not_have_refuses_as_invalid(in_place_ways):
    """A direct call of the in-place text encoder with an unknown adapter: INVALID_ARGUMENT, the
    network never runs with weights other than those asked for."""
    from utils.grpc_client import infer_inputs

    client = in_place_ways["ensemble"].client
    ids, mask, skipped = specs.TEXT_ENCODER.inputs
    tokens = {ids.name: np.zeros((1, 77), dtype=np.int32), mask.name: np.ones((1, 77), dtype=np.int32),
              skipped.name: skipped.to_wire(np.zeros(1, dtype=np.int32))}
    with pytest.raises(InferenceServerException, match=r"INVALID_ARG.*lora=\['nope'\] is not served"):
        client.infer(specs.TEXT_ENCODER.name, infer_inputs(tokens), parameters={"lora": "nope:1.0"})
    with pytest.raises(InferenceServerException, match=r"INVALID_ARG.*the request parameter lora='nope': write it "
                                                       r"name:weight,name:weight"):
        client.infer(specs.TEXT_ENCODER.name, infer_inputs(tokens), parameters={"lora": "nope"})
    assert client.infer(specs.TEXT_ENCODER.name, infer_inputs(tokens)).as_numpy(specs.TEXT_ENCODER.output_names[0]) \
        is not None  # still serving
