"""SDXL's request inputs (utils/specs.py's SDXL_INPUTS): their checks, and the UNet's time ids
from them, as diffusers' StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline make them.

An SD1.x deployment refuses each of them by name: its UNet has no added conditions, and a request
that relies on one would otherwise get an image made without it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from utils import specs
from utils.errors import InvalidRequest
from utils.families import SDXL_REFINER, Family

# The refiner's aesthetic scores where a request gives none (diffusers' image to image pipeline's).
DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5
AESTHETIC_SCORE_RANGE = (0.0, 10.0)  # the LAION aesthetic predictor's scale, which the refiner was trained on
MAX_SIZE_CONDITION = 16384  # pixels: far past any trained size, small enough to be harmless
_SIZES = (specs.ORIGINAL_SIZE, specs.CROPS_COORDS_TOP_LEFT, specs.TARGET_SIZE)


def check_added_conditions(request, family: Family, refiner: bool, prompts: int | None = None):
    """The SDXL inputs of a request, checked and normalized (sizes as (height, width) tuples); an
    SD1.x checkpoint's deployment refuses each one sent. ``refiner``: whether the deployment serves
    SDXL's refiner (high_noise_frac asks for it); ``prompts``: how many the request has."""
    sent = [t.name for t in specs.SDXL_INPUTS if getattr(request, t.name) is not None]
    if sent and not family.added_conditions:
        raise InvalidRequest(f"{sent[0]} is an SDXL input: this deployment serves an SD1.x checkpoint, whose UNet has "
                             f"no added conditions; leave it out, or send the request to an SDXL deployment.")
    fields = {}
    for tensor in (specs.PROMPT_2, specs.NEGATIVE_PROMPT_2):
        texts = getattr(request, tensor.name)
        if texts is not None:
            texts = [texts] if isinstance(texts, str) else list(texts)
            if prompts is not None and len(texts) not in (1, prompts):
                raise InvalidRequest(f"{tensor.name} has {len(texts)} entries for {prompts} prompts: send one per "
                                     f"prompt, or a single one for all.")
            fields[tensor.name] = (texts * prompts if prompts and len(texts) == 1 else texts) or None
    for tensor in _SIZES:
        value = getattr(request, tensor.name)
        if value is not None:
            fields[tensor.name] = _size(tensor.name, value, low=0 if tensor is specs.CROPS_COORDS_TOP_LEFT else 1)
    for tensor in (specs.AESTHETIC_SCORE, specs.NEGATIVE_AESTHETIC_SCORE):
        value = getattr(request, tensor.name)
        low, high = AESTHETIC_SCORE_RANGE
        if value is not None and not (_finite(tensor.name, value) and low <= float(value) <= high):
            raise InvalidRequest(f"{tensor.name}={value!r} is not allowed: use a number in [{low:g}, {high:g}] "
                                 f"(the refiner's aesthetic scale; diffusers' defaults 6 and 2.5).")
    fraction = request.high_noise_frac
    if fraction is not None:
        if not refiner:
            raise InvalidRequest(f"high_noise_frac={fraction!r} hands the last steps to SDXL's refiner, which this "
                                 f"deployment does not serve: write the repository with --refiner, or leave it out.")
        if not (_finite("high_noise_frac", fraction) and 0 < float(fraction) < 1):
            raise InvalidRequest(f"high_noise_frac={fraction!r} is not allowed: use the fraction of the steps the base "
                                 f"denoises, in (0, 1) (diffusers' example: 0.8).")
        fields["high_noise_frac"] = float(fraction)
    return replace(request, **fields)


def time_ids(request, family: Family, height: int, width: int) -> tuple[list[float], list[float]]:
    """The UNet's time ids for images of ``height`` x ``width`` pixels, (unconditional, conditional):
    original size, crop's top-left corner, then the target size (the refiner: the aesthetic score),
    as diffusers' _get_add_time_ids makes them (the sizes default to the image's)."""
    original = tuple(request.original_size or (height, width))
    crops = tuple(request.crops_coords_top_left or (0, 0))
    if family is SDXL_REFINER:  # its last time id is the aesthetic score
        score = DEFAULT_AESTHETIC_SCORE if request.aesthetic_score is None else request.aesthetic_score
        negative = (DEFAULT_NEGATIVE_AESTHETIC_SCORE if request.negative_aesthetic_score is None
                    else request.negative_aesthetic_score)
        return [*original, *crops, negative], [*original, *crops, score]
    target = tuple(request.target_size or (height, width))
    return [*original, *crops, *target], [*original, *crops, *target]


def _size(name: str, value, low: int) -> tuple[int, int]:
    values = value.reshape(-1).tolist() if isinstance(value, np.ndarray) else list(value)
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values) or \
            not all(low <= v <= MAX_SIZE_CONDITION for v in values):
        raise InvalidRequest(f"{name}={values!r} is not allowed: send [height, width] in pixels, integers in "
                             f"[{low}, {MAX_SIZE_CONDITION}].")
    return int(values[0]), int(values[1])


def _finite(name: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InvalidRequest(f"{name}={value!r} is not a number.")
    return math.isfinite(float(value))
