"""Inpainting: the shared loop against diffusers' StableDiffusionInpaintPipeline, with a plain UNet
(4 channels: the loop blends the image back outside the mask) and an inpainting UNet (9 channels:
the mask and the masked image go into the UNet), in this process (the served ways are in
tests/test_end_to_end.py and tests/test_inpainting_served.py); and the mask's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.components import PipelineComponents
from pipelines.stable_diffusion import StableDiffusion
from utils import specs
from utils.networks import load_network
from utils.request import GenerationRequest, InvalidRequest, check_request

SIZE = 64  # the tiny presets' image


def photo_and_mask(seed: int = 0, images: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A random picture, and a mask that repaints a square in its middle (grey levels around the
    threshold at its edge, so that the binarization is exercised)."""
    rng = np.random.default_rng(seed)
    photo = rng.integers(0, 256, (images, SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((1, SIZE, SIZE), dtype=np.uint8)
    mask[:, 16:48, 20:52] = 255
    mask[:, 16, 20:52] = 127  # under the threshold: kept
    mask[:, 47, 20:52] = 128  # at it: repainted
    return photo, mask


def in_process(model_dir, calls: dict | None = None) -> StableDiffusion:
    """The loop with each network a torch module in this process (what the served ones export);
    ``calls`` counts each network's calls."""
    networks = {name: load_network(name, model_dir) for name in specs.NETWORKS}

    def call(network, *inputs, adapters=()):
        if calls is not None:
            calls[network.name] = calls.get(network.name, 0) + 1
        with torch.no_grad():
            return (networks[network.name](*inputs),)

    return StableDiffusion(PipelineComponents.from_pretrained(model_dir), call)


def diffusers_inpaint(model_dir, photo, mask, scheduler: str | None = None, seed: int = 0, **options) -> np.ndarray:
    """StableDiffusionInpaintPipeline's images, uint8, for the same photo and mask (as PIL images)."""
    import diffusers
    from PIL import Image

    pipeline = diffusers.StableDiffusionInpaintPipeline.from_pretrained(model_dir, safety_checker=None,
                                                                        requires_safety_checker=False)
    if scheduler is not None:
        pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(image=[Image.fromarray(p) for p in photo], mask_image=[Image.fromarray(m) for m in mask],
                      height=photo.shape[1], width=photo.shape[2], generator=torch.Generator().manual_seed(seed),
                      output_type="np", **options).images
    return (images * 255).round().astype(np.uint8)


CASES = {  # name: (checkpoint, options)
    "plain UNet, strength 1": ("tiny", dict(strength=1.0)),
    "plain UNet, strength 0.6, 2 images": ("tiny", dict(strength=0.6, num_images_per_prompt=2)),
    "plain UNet, EulerAncestral (draws at each step)": ("tiny", dict(scheduler="EulerAncestralDiscreteScheduler")),
    "plain UNet, DDIM (the checkpoint's clip_sample: false)": ("tiny", dict(scheduler="DDIMScheduler", strength=0.7)),
    "inpainting UNet, strength 1": ("tiny-inpaint", dict(strength=1.0)),
    "inpainting UNet, strength 0.6, guidance 1": ("tiny-inpaint", dict(strength=0.6, guidance_scale=1.0)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_loop_inpaints_as_diffusers(case, tiny_model, tiny_inpaint):
    from conftest import report

    checkpoint, options = CASES[case]
    model_dir = tiny_model if checkpoint == "tiny" else tiny_inpaint
    photo, mask = photo_and_mask()
    options = dict(prompt=["a red door"], num_inference_steps=6, seed=3, **options)
    ours = in_process(model_dir)(GenerationRequest(image=photo, mask_image=mask, **options))
    reference = diffusers_inpaint(model_dir, photo, mask, **options)
    difference = int(np.abs(ours.numpy().astype(int) - reference.astype(int)).max())
    report(f"inpaint in process vs diffusers, {case}: max pixel difference {difference} (allowed 2)")
    assert ours.shape == reference.shape and difference <= 2
    if checkpoint == "tiny":  # a plain UNet keeps the image outside the mask (up to the VAE's round trip)
        assert not np.array_equal(ours.numpy()[0], photo[0])


@pytest.mark.parametrize("strength, encodes", [(1.0, 1), (0.7, 2)])
def test_an_inpainting_unet_encodes_the_image_only_where_it_starts_from_it(strength, encodes, tiny_inpaint):
    """From noise (strength 1, the default) an inpainting UNet needs the masked image alone, as
    diffusers encodes it; a plain UNet needs the image alone (its blend), with no masked image."""
    photo, mask = photo_and_mask()
    calls = {}
    in_process(tiny_inpaint, calls)(GenerationRequest(prompt=["a"], image=photo, mask_image=mask, strength=strength,
                                                      num_inference_steps=2, seed=0))
    assert calls[specs.VAE_ENCODER.name] == encodes


def test_a_plain_unet_encodes_the_image_alone(tiny_model):
    photo, mask = photo_and_mask()
    calls = {}
    in_process(tiny_model, calls)(GenerationRequest(prompt=["a"], image=photo, mask_image=mask, num_inference_steps=2,
                                                    seed=0))
    assert calls[specs.VAE_ENCODER.name] == 1


def test_a_served_fp32_strength_keeps_the_steps_a_client_asked_for():
    """A strength of 0.7 arrives as FP32 0.699999988: read as sent, 10 steps keep 7, as diffusers."""
    from utils.request import request_from_arrays

    photo, mask = photo_and_mask()
    arrays = {"prompt": np.array([b"a"], dtype=object), "image": photo, "mask_image": mask,
              "strength": np.array([0.7], np.float32), "lora_scale": np.array([0.7], np.float32)}
    request = request_from_arrays(arrays, specs.IMAGE_TO_IMAGE)
    assert request.strength == 0.7 and request.lora_scale == [0.7]


def test_guidance_cut_off_is_refused_with_a_mask_which_diffusers_does_not_cut():
    photo, mask = photo_and_mask()
    with pytest.raises(InvalidRequest, match="cfg_cutoff_step_ratio=0.5 is not allowed with a mask_image"):
        check_request(GenerationRequest(prompt=["a"], image=photo, mask_image=mask, cfg_cutoff_step_ratio=0.5), 4, 50)


def test_a_step_given_no_image_still_checks_the_mask():
    """The ensemble's denoise step checks what it has: the mask's own shape and content."""
    from utils.request import check_options

    with pytest.raises(InvalidRequest, match=r"mask_image\[0\] is black everywhere"):
        check_options(GenerationRequest(mask_image=np.zeros((1, SIZE, SIZE), np.uint8)), 50, image_to_image=True)
    with pytest.raises(InvalidRequest, match=r"mask_image has shape \[0, 64, 64\]"):
        check_options(GenerationRequest(mask_image=np.zeros((0, SIZE, SIZE), np.uint8)), 50, image_to_image=True)


def test_an_inpainting_checkpoint_refuses_a_request_without_a_mask(tiny_inpaint):
    with pytest.raises(InvalidRequest, match="mask_image is required: this deployment serves an inpainting"):
        in_process(tiny_inpaint)(GenerationRequest(prompt=["a cat"], num_inference_steps=2, seed=0))


BAD_MASKS = {  # what is wrong: (mask, the message's start)
    "float": (np.ones((1, SIZE, SIZE), np.float32), "mask_image is float32: send uint8 grey levels"),
    "RGB": (np.zeros((1, SIZE, SIZE, 3), np.uint8), r"mask_image has shape \[1, 64, 64, 3\]: send uint8"),
    "another size": (np.full((1, SIZE, SIZE // 2), 255, np.uint8), r"mask_image has shape \[1, 64, 32\] for an image"),
    "all black": (np.zeros((1, SIZE, SIZE), np.uint8), r"mask_image\[0\] is black everywhere: nothing to repaint"),
    "all white": (np.full((1, SIZE, SIZE), 200, np.uint8), r"mask_image\[0\] is white everywhere: nothing of the"),
    "three for two images": (np.full((3, SIZE, SIZE), 255, np.uint8), r"mask_image has shape \[3, 64, 64\]"),
}


@pytest.mark.parametrize("case", BAD_MASKS)
def test_a_bad_mask_is_refused_by_name_with_the_fix(case):
    mask, message = BAD_MASKS[case]
    photo, _ = photo_and_mask(images=2)
    with pytest.raises(InvalidRequest, match=message):
        check_request(GenerationRequest(prompt=["a", "b"], image=photo, mask_image=mask), max_prompts=4, max_steps=50)


def test_a_mask_without_an_image_is_refused():
    _, mask = photo_and_mask()
    with pytest.raises(InvalidRequest, match="mask_image is for inpainting, which repaints an image: send the image"):
        check_request(GenerationRequest(prompt=["a"], mask_image=mask), max_prompts=4, max_steps=50)


def test_inpainting_defaults_to_strength_1_as_diffusers_and_image_to_image_to_0_8():
    photo, mask = photo_and_mask()
    assert check_request(GenerationRequest(prompt=["a"], image=photo, mask_image=mask), 4, 50).strength == 1.0
    assert check_request(GenerationRequest(prompt=["a"], image=photo), 4, 50).strength == 0.8
