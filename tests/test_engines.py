"""TensorRT engines: the exact trtexec commands from the specs, and the provenance check."""

from __future__ import annotations

import shutil
import stat

import pytest

from utils import specs
from utils.models import preset_dims
from utils.deployment import Deployment
from utils.repository.engines import (EngineMismatch, Provenance, Target, build_engine, check_engines, parse_build_log, plan_path,
                           profile_shapes, trtexec_command)
from utils.errors import UsageError
from utils.repository.writer import write_repository

SD15 = specs.ModelDims(text_length=77, text_hidden=768, latent_channels=4, latent_height=64, latent_width=64,
                       vae_scale_factor=8)
REPO = "triton/models"
EXPECTED_SD15 = {
    "text_encoder": "--minShapes=input_ids:1x77,attention_mask:1x77,skipped_layers:1 "
                    "--optShapes=input_ids:2x77,attention_mask:2x77,skipped_layers:2 "
                    "--maxShapes=input_ids:64x77,attention_mask:64x77,skipped_layers:64",
    # The image sizes: 384 to 768 pixels a side by default, SD1.5's 512 as the optimum; prompts of
    # one chunk of 77 tokens to three (231).
    "unet": "--minShapes=sample:1x4x48x48,timestep:1,encoder_hidden_states:1x77x768 "
            "--optShapes=sample:2x4x64x64,timestep:2,encoder_hidden_states:2x77x768 "
            "--maxShapes=sample:16x4x96x96,timestep:16,encoder_hidden_states:16x231x768",
    "vae_encoder": "--minShapes=image:1x3x384x384 --optShapes=image:1x3x512x512 --maxShapes=image:4x3x768x768",
    "vae_decoder": "--minShapes=sample:1x4x48x48 --optShapes=sample:1x4x64x64 --maxShapes=sample:4x4x96x96",
}
# What trtexec 10.x prints about the device before building (the lines parse_build_log reads).
TRTEXEC_LOG = """&&&& RUNNING TensorRT.trtexec [TensorRT v100500] [b18] # trtexec --onnx=...
[11/24/2026-10:00:00] [I] === Device Information ===
[11/24/2026-10:00:00] [I] Available Devices:
[11/24/2026-10:00:00] [I]   Device 0: "NVIDIA H100 80GB HBM3" UUID: GPU-0
[11/24/2026-10:00:00] [I] Selected Device: NVIDIA H100 80GB HBM3
[11/24/2026-10:00:00] [I] Selected Device ID: 0
[11/24/2026-10:00:00] [I] Compute Capability: 9.0
[11/24/2026-10:00:00] [I] TensorRT version: 10.5.0
"""


@pytest.mark.parametrize("name", specs.NETWORKS)
def test_trtexec_command_per_network(name):
    command = trtexec_command(specs.NETWORKS[name], SD15, REPO)
    assert " ".join(command) == (
        f"trtexec --onnx=triton/models/{name}/1/model.onnx --saveEngine=triton/models/{name}/2/model.plan "
        f"{EXPECTED_SD15[name]} --fp16 --timingCacheFile=engines/timing.cache"
    )


def test_an_inpainting_unets_engine_takes_its_nine_channels_and_the_decoder_keeps_four():
    inpaint = preset_dims("sd15-random-inpaint")
    unet, decoder = (" ".join(trtexec_command(specs.NETWORKS[name], inpaint, REPO)) for name in ("unet", "vae_decoder"))
    assert "--optShapes=sample:2x9x64x64," in unet and "--maxShapes=sample:16x9x96x96," in unet
    assert "--optShapes=sample:1x4x64x64 " in decoder  # the latents themselves: the VAE's 4 channels


def test_fp32_engine_has_no_fp16_flag_and_bad_precision_is_refused():
    assert "--fp16" not in trtexec_command(specs.UNET, SD15, REPO, precision="fp32")
    with pytest.raises(ValueError, match=r"precision='int8' is not supported"):
        trtexec_command(specs.UNET, SD15, REPO, precision="int8")


def test_profile_shapes_follow_the_spec_and_the_image_sizes():
    assert profile_shapes(specs.VAE_DECODER, SD15) == {
        "sample": {"min": [1, 4, 48, 48], "opt": [1, 4, 64, 64], "max": [4, 4, 96, 96]},
    }
    assert profile_shapes(specs.VAE_DECODER, SD15, specs.ImageSizes(256, 1024, 8)) == {
        "sample": {"min": [1, 4, 32, 32], "opt": [1, 4, 64, 64], "max": [4, 4, 128, 128]},
    }


def test_build_log_parsing():
    assert parse_build_log(TRTEXEC_LOG) == {
        "tensorrt_version": "10.5.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
    }
    with pytest.raises(RuntimeError, match="no 'Compute Capability' line"):
        parse_build_log(TRTEXEC_LOG.replace("Compute Capability: 9.0", ""))


def test_failed_build_reports_the_command_and_trtexecs_last_lines(tmp_path):
    failing = tmp_path / "trtexec"
    failing.write_text("#!/bin/sh\necho '[E] Error[4]: [network.cpp::validate] profile is invalid'\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "logs" / "unet.log"
    with pytest.raises(RuntimeError, match=r"(?s)trtexec failed for unet \(exit code 1\)\. The command:\n.*"
                                           r"--saveEngine=.*unet/2/model.plan.*profile is invalid"):
        build_engine(specs.UNET, SD15, tmp_path / "repo", log, wrap=lambda command: [str(failing), *command[1:]])
    assert not plan_path(tmp_path / "repo", specs.UNET).with_name("engine.json").exists()


@pytest.fixture
def tensorrt_repository(tmp_path, tiny_model, exports):
    """A repository written for the tensorrt backend, with a provenance file per (absent) plan."""
    write_repository(tmp_path, tiny_model, {name: r.path for name, r in exports.items()}, Deployment(backend="tensorrt"))
    for network in specs.NETWORKS.values():
        plan = plan_path(tmp_path, network)
        plan.write_bytes(b"not a real engine: only its provenance is read here")
        Provenance(tensorrt_version="10.5.0.18", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                   precision="fp16", profiles={}, command=[]).save(plan)
    return tmp_path


H100 = Target(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt_version="10.5.0")


def test_matching_engines_are_accepted(tensorrt_repository):
    assert check_engines(tensorrt_repository, H100) == list(specs.NETWORKS)


def test_engine_for_another_gpu_is_refused(tensorrt_repository):
    a100 = Target(gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0", tensorrt_version="10.5.0")
    with pytest.raises(EngineMismatch, match=r"unet/2/model.plan was built for compute capability 9.0 \(NVIDIA H100 "
                                             r"80GB HBM3\) but this GPU is 8.0 \(NVIDIA A100-SXM4-80GB\): rebuild"):
        check_engines(tensorrt_repository, a100)


def test_engine_for_another_tensorrt_is_refused(tensorrt_repository):
    newer = Target(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt_version="10.7.0")
    with pytest.raises(EngineMismatch, match=r"built with TensorRT 10.5.0.18 but the server runs TensorRT 10.7.0"):
        check_engines(tensorrt_repository, newer)


def test_engine_without_provenance_is_refused(tensorrt_repository):
    plan_path(tensorrt_repository, specs.UNET).with_name("engine.json").unlink()
    with pytest.raises(EngineMismatch, match=r"unet/2/model.plan has no engine.json, so where it can run is unknown"):
        check_engines(tensorrt_repository, H100)


def test_missing_engine_is_refused(tensorrt_repository):
    shutil.rmtree(plan_path(tensorrt_repository, specs.VAE_DECODER).parent)
    with pytest.raises(EngineMismatch, match=r"vae_decoder/2/model.plan is missing: build it"):
        check_engines(tensorrt_repository, H100)


def test_repository_without_tensorrt_models_needs_no_check(repository):
    assert check_engines(repository, H100) == []


def test_the_repositorys_image_sizes_are_the_engines_profiles(tmp_path, tiny_model, exports):
    """--image-sizes when writing the repository; the engine build reads them back from it."""
    from utils.deployment import served_sizes

    write_repository(tmp_path, tiny_model, {name: r.path for name, r in exports.items()},
                     Deployment(backend="tensorrt", image_sizes=(32, 128)))
    dims = specs.ModelDims.from_pretrained(tiny_model)
    sizes = served_sizes(tmp_path, specs.TEXT_TO_IMAGE.name, dims)
    assert sizes == specs.ImageSizes(32, 128, 8)
    command = " ".join(trtexec_command(specs.VAE_DECODER, dims, tmp_path, sizes=sizes))
    assert "--minShapes=sample:1x4x4x4 --optShapes=sample:1x4x8x8 --maxShapes=sample:4x4x16x16" in command


@pytest.mark.parametrize("image_sizes", [(50, 96), (96, 48), (0, 64)])
def test_image_sizes_the_checkpoint_cannot_serve_are_refused(image_sizes, tmp_path, tiny_model, exports):
    with pytest.raises(UsageError, match=rf"--image-sizes {image_sizes[0]}-{image_sizes[1]}: give MIN-MAX in pixels, "
                                         r"multiples of 8 \(one latent pixel\), the smaller first, e\.g\. 48-96"):
        write_repository(tmp_path, tiny_model, {name: r.path for name, r in exports.items()},
                         Deployment(image_sizes=image_sizes))
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
