"""The request's table as the README states it: every input of the pipelines, its type, shape,
default and what is allowed, from the checks' own constants."""

from __future__ import annotations

from utils import specs
from utils.families import SD, SDXL
from utils.lora import FUSED_SCALE
from utils.mask import MASK_THRESHOLD
from utils.models import SD15_SCHEDULER, SD15_SCHEDULER_CLASS, preset_dims
from utils.request import (DEFAULT_INPAINT_STRENGTH, DEFAULT_NUM_INFERENCE_STEPS,
                           FEW_STEP_MAX_STEPS, FEW_STEP_SCHEDULERS, GUIDANCE_SCALE_RANGE,
                           LORA_SCALE_RANGE, MAX_LORAS, MAX_PROMPT_BYTES, SCHEDULERS, max_inference_steps)

SD15 = preset_dims("sd15-random")  # SD1.5's architecture, so its sizes


def request_table() -> str:
    """Every input of the pipelines: text to image takes all but ``image`` and ``strength``, image
    to image all but ``height`` and ``width`` (its image's size is the output's)."""
    max_prompts = specs.MAX_PROMPTS
    low, high = GUIDANCE_SCALE_RANGE
    sizes = specs.ImageSizes.default(SD15)
    size_range = f"a multiple of {sizes.step} in [{sizes.min}, {sizes.max}] (SD1.5's default; --image-sizes)"
    allowed = {
        specs.PROMPT.name: ("required", f"1 to {max_prompts} prompts (N), each up to {MAX_PROMPT_BYTES} UTF-8 bytes; "
                                        f"compel's weighting syntax; up to {specs.MAX_PROMPT_CHUNKS} x "
                                        f"{SD15.text_length - 2} tokens, the rest cut and reported "
                                        f"([docs/prompts.md](docs/prompts.md))"),
        specs.NEGATIVE_PROMPT.name: ("none", "one per prompt, or one for all"),
        specs.INIT_IMAGE.name: ("image to image: required", f"uint8 RGB, height and width each {size_range}; one "
                                                            f"per prompt or one for all"),
        specs.MASK_IMAGE.name: ("none", f"inpainting, with `image`: uint8 grey levels of the image's size, white "
                                        f"({MASK_THRESHOLD} and up) where to repaint; one per image or one for all; "
                                        f"not all black, not all white ([docs/inpainting.md](docs/inpainting.md))"),
        specs.STRENGTH.name: (f"the family's: {SD.default_strength:g} (SD1.x), {SDXL.default_strength:g} (SDXL); "
                              f"inpainting {DEFAULT_INPAINT_STRENGTH:g}",
                              "image to image: in (0, 1]; keeps int(steps x strength) of the steps"),
        specs.SCHEDULER.name: (f"the checkpoint's (SD1.5: {SD15_SCHEDULER_CLASS})", ", ".join(f"`{name}`" for name in SCHEDULERS)),
        specs.NUM_IMAGES_PER_PROMPT.name: ("1", f"at least 1, with N x num_images_per_prompt <= {max_prompts}"),
        specs.HEIGHT.name: (f"the checkpoint's ({SD15.image_height})", f"text to image: {size_range}"),
        specs.WIDTH.name: (f"the checkpoint's ({SD15.image_width})", f"text to image: {size_range}"),
        specs.GUIDANCE_SCALE.name: (f"the family's: {SD.default_guidance_scale:g} (SD1.x), "
                                    f"{SDXL.default_guidance_scale:g} (SDXL)", f"a finite number in [{low:g}, {high:g}]; 1 or less: "
                                                                 f"no guidance (half the UNet rows)"),
        specs.CFG_CUTOFF_STEP_RATIO.name: ("none (guidance to the end)",
                                           "[0, 1]: guidance stops after the step at this fraction of the steps, "
                                           "then the UNet runs half the rows (diffusers' `SDCFGCutoffCallback`)"),
        specs.NUM_INFERENCE_STEPS.name: (f"{DEFAULT_NUM_INFERENCE_STEPS}",
                                         f"[1, {max_inference_steps(SD15_SCHEDULER)}] (SD1.5's scheduler); "
                                         f"[1, {FEW_STEP_MAX_STEPS}] with {' and '.join(FEW_STEP_SCHEDULERS)}"),
        specs.SEED.name: ("random", "[0, 2^63-1]; the same seed gives the same image"),
        specs.LORA.name: ("none (the base weights)", f"up to {MAX_LORAS} names of the deployment's adapters (`--lora "
                                                     f"NAME=PATH`); each served fused into a UNet of its own, one per "
                                                     f"request ([docs/lora.md](docs/lora.md))"),
        specs.LORA_SCALE.name: ("1 per adapter", f"one weight per name in `lora`, finite, in [{LORA_SCALE_RANGE[0]:g}, "
                                                 f"{LORA_SCALE_RANGE[1]:g}]; fused adapters: {FUSED_SCALE:g}"),
        specs.CLIP_SKIP.name: ("0 (the last layer)", f"[0, {SD15.text_layers - 1}]: the text encoder's layer that "
                                                     f"many before the last, through its final layer norm (diffusers' "
                                                     f"`clip_skip`; 1 is A1111's \"clip skip 2\")"),
        **_control_rows(),
        **_sdxl_rows(),
    }
    shapes = {specs.NEGATIVE_PROMPT.name: "[N] or [1]", specs.PROMPT_2.name: "[N] or [1]",
              specs.NEGATIVE_PROMPT_2.name: "[N] or [1]", **{t.name: "[2]" for t in specs.SDXL_INPUTS if t.dims == (2,)}, specs.INIT_IMAGE.name: "[N, H, W, 3] or [1, H, W, 3]",
              specs.MASK_IMAGE.name: "[N, H, W] or [1, H, W]", specs.CONTROL_IMAGE.name: "[K, H, W, 3]",
              **{t.name: "[K] or [1]" for t in specs.CONTROL_INPUTS[2:]}, specs.CONTROLNET_NAMES.name: "[K]"}
    rows = ["| input | type | shape | default | allowed |", "| --- | --- | --- | --- | --- |"]
    for tensor in specs.REQUEST_INPUTS:
        shape = shapes.get(tensor.name, "[N]" if tensor.dims == (-1,) else "[1]")
        default, values = allowed[tensor.name]
        rows.append(f"| `{tensor.name}` | {tensor.dtype} | {shape} | {default} | {values} |")
    images, truncated = specs.TEXT_TO_IMAGE.outputs
    rows.append(f"| output `{images.name}` | {images.dtype} | [N x num_images_per_prompt, H, W, 3] | | |")
    rows.append(f"| output `{truncated.name}` | {truncated.dtype} | [N] or [2N] | | the text cut from each prompt "
                f"past the longest served (the negative prompts first, with guidance); empty where none |")
    return "\n".join(rows)


def _control_rows() -> dict[str, tuple[str, str]]:
    """The request table's ControlNet rows (utils/controlnet.py's checks)."""
    from utils.controlnet import AS_SENT, CONDITIONING_SCALE_RANGE, CONTROL_MODES

    low, high = CONDITIONING_SCALE_RANGE
    return {
        specs.CONTROLNET_NAMES.name: ("the deployment's one ControlNet", "K names of the deployment's ControlNets "
                                                                         "([docs/controlnet.md](docs/controlnet.md))"),
        specs.CONTROL_IMAGE.name: ("none", "text to image: uint8 RGB, one per ControlNet, the image's size (H and W "
                                           "follow it)"),
        specs.CONTROL_MODE.name: (f"`{AS_SENT}` (as sent)", ", ".join(f"`{mode}`" for mode in CONTROL_MODES) +
                                  ": the control image is a photo, made into the control image on the server"),
        specs.CONTROLNET_CONDITIONING_SCALE.name: ("1", f"each ControlNet's weight, in [{low:g}, {high:g}]"),
        specs.CONTROL_GUIDANCE_START.name: ("0", "[0, 1): the fraction of the steps each ControlNet starts at"),
        specs.CONTROL_GUIDANCE_END.name: ("1", "(0, 1]: and ends at, after its start"),
    }


def _sdxl_rows() -> dict[str, tuple[str, str]]:
    """The request table's SDXL rows (utils/added_conditions.py's checks); an SD1.x deployment refuses them."""
    from utils.added_conditions import (AESTHETIC_SCORE_RANGE, DEFAULT_AESTHETIC_SCORE,
                                        DEFAULT_NEGATIVE_AESTHETIC_SCORE, MAX_SIZE_CONDITION)

    low, high = AESTHETIC_SCORE_RANGE
    sdxl = "SDXL ([docs/sdxl.md](docs/sdxl.md)): "
    return {
        specs.PROMPT_2.name: ("`prompt`", sdxl + "the second text encoder's prompts"),
        specs.NEGATIVE_PROMPT_2.name: ("`negative_prompt`", sdxl + "the second text encoder's negative prompts"),
        specs.ORIGINAL_SIZE.name: ("the image's size", sdxl + f"[height, width] in pixels, in [1, {MAX_SIZE_CONDITION}]"),
        specs.CROPS_COORDS_TOP_LEFT.name: ("[0, 0]", sdxl + f"[top, left] in pixels, in [0, {MAX_SIZE_CONDITION}]"),
        specs.TARGET_SIZE.name: ("the image's size", sdxl + f"[height, width] in pixels, in [1, {MAX_SIZE_CONDITION}]"),
        specs.AESTHETIC_SCORE.name: (f"{DEFAULT_AESTHETIC_SCORE:g}", sdxl + f"the refiner's, in [{low:g}, {high:g}]"),
        specs.NEGATIVE_AESTHETIC_SCORE.name: (f"{DEFAULT_NEGATIVE_AESTHETIC_SCORE:g}",
                                              sdxl + f"the refiner's unconditional rows', in [{low:g}, {high:g}]"),
        specs.HIGH_NOISE_FRAC.name: ("none (the base alone)", sdxl + "text to image, with `--refiner`: the base denoises "
                                                                     "this fraction of the steps, in (0, 1), the refiner "
                                                                     "the rest"),
    }


def family_defaults() -> str:
    """What a request left without a guidance scale or (image to image) a strength gets, per family:
    diffusers' pipelines' defaults (utils/families.py)."""
    from utils.families import SDXL_REFINER

    families = (SD, SDXL, SDXL_REFINER)
    rows = [("guidance scale", "default_guidance_scale"), ("image to image's strength", "default_strength")]
    lines = ["| where a request gives none | " + " | ".join(family.title for family in families) + " |",
             "| --- |" + " --- |" * len(families)]
    lines += [f"| {label} | " + " | ".join(f"{getattr(family, field):g}" for family in families) + " |"
              for label, field in rows]
    return "\n".join(lines)

