"""A generation request and its checks, shared by every client and every served model.

Text to image, image to image where the request carries an ``image`` and a ``strength``, or
inpainting where it carries a ``mask_image`` too, with the arguments named as diffusers names them.
Every error names the argument, the value received and what is allowed, so that a client can fix
its request from the message alone (no traceback, no server path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Mapping, Sequence

import numpy as np
from tritonclient.utils import triton_to_np_dtype

from utils import specs
from utils.errors import InvalidRequest
from utils.layout import SERVED_NAME
from utils.mask import check_mask

DEFAULT_GUIDANCE_SCALE = 7.5  # SD1.x's (diffusers' StableDiffusionPipeline's); a family's own: utils/families.py
DEFAULT_NUM_INFERENCE_STEPS = 50
DEFAULT_STRENGTH = 0.8  # diffusers' StableDiffusionImg2ImgPipeline's
DEFAULT_INPAINT_STRENGTH = 1.0  # and StableDiffusionInpaintPipeline's: the masked part from pure noise
# Few-step sampling (with a distilled model or adapter: LCM, LCM-LoRA, TCD): diffusers draws their
# steps from a schedule of original_inference_steps (its config's, 50 by default), so no more than that.
FEW_STEP_SCHEDULERS = ("LCMScheduler", "TCDScheduler")
FEW_STEP_MAX_STEPS = 50
DEFAULT_PREVIEW_EVERY = 1  # the streaming pipeline's: a progress response (and preview) every step
# The schedulers a request may choose (diffusers' class names; never evaluated, only looked up
# once found here), each built from the checkpoint's scheduler config.
SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", *FEW_STEP_SCHEDULERS)
MAX_PROMPT_BYTES = 2048  # far above what the tokenizer keeps (77 tokens), small enough to be harmless
GUIDANCE_SCALE_RANGE = (0.0, 100.0)
# LoRA: at most this many adapters in one request (diffusers' set_adapters takes any number; each
# one applied costs the in-process swap a pass over its weights), each weighted within this range
# (diffusers takes any number; past 2 an adapter's delta usually overwhelms the base weights).
MAX_LORAS = 4
LORA_SCALE_RANGE = (-2.0, 2.0)
SEED_RANGE = (0, 2**63 - 1)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Sequence[str] = ()
    negative_prompt: Sequence[str] | None = None
    image: np.ndarray | None = None  # image to image: uint8 [N, H, W, 3] (or [H, W, 3]), one per prompt or one for all
    # Inpainting: uint8 [N, H, W] (or [H, W]), the image's size, white where to repaint; one per image or one for all.
    mask_image: np.ndarray | None = None
    # Image to image: how much of the image is noised away, in (0, 1]; None: DEFAULT_STRENGTH, or
    # DEFAULT_INPAINT_STRENGTH with a mask, as diffusers' two pipelines default.
    strength: float | None = None
    scheduler: str | None = None  # one of SCHEDULERS; None: the checkpoint's own
    num_images_per_prompt: int = 1
    height: int | None = None  # text to image: the size in pixels; None: the checkpoint's
    width: int | None = None
    guidance_scale: float | None = None  # None: the served family's default, diffusers' (utils/families.py)
    # Guidance stops after the step at this fraction of the steps (diffusers' SDCFGCutoffCallback:
    # the UNet then runs the conditional rows alone); None: guidance to the end.
    cfg_cutoff_step_ratio: float | None = None
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS
    seed: int | None = None  # None: a fresh random seed
    lora: Sequence[str] = ()  # LoRA adapters by name: those the deployment serves (none: the base weights)
    lora_scale: Sequence[float] | None = None  # one weight per adapter, as diffusers' set_adapters (None: 1 each)
    # ControlNet (text to image; utils/controlnet.py checks these): the deployment's ControlNets by name (none
    # named: its only one), a control image each, uint8 [K, H, W, 3] at the image's size, made from a photo
    # where its control_mode says how ("canny"), and as diffusers names them, each one's weight and the
    # fraction of the steps it acts in (None: 1, and from 0 to 1).
    controlnet: Sequence[str] = ()
    control_image: np.ndarray | None = None
    control_mode: Sequence[str] = ()
    controlnet_conditioning_scale: Sequence[float] | None = None
    control_guidance_start: Sequence[float] | None = None
    control_guidance_end: Sequence[float] | None = None
    # The text encoder's layer whose output conditions the UNet, counted back from the last (0), as
    # diffusers' clip_skip (1 is A1111's "clip skip 2"; None: 0); pipelines/prompts.py checks it.
    clip_skip: int | None = None
    # SDXL (utils/added_conditions.py checks these), as diffusers names them: the second text encoder's
    # prompts (None: the same); the time ids, each (height, width) in pixels (None: the image's size,
    # and (0, 0)); the refiner's aesthetic scores (None: 6 and 2.5); and base then refiner, diffusers'
    # ensemble of expert denoisers, where the deployment serves a refiner: the base denoises the
    # first high_noise_frac of the steps, the refiner the rest (None: the base alone).
    prompt_2: Sequence[str] | None = None
    negative_prompt_2: Sequence[str] | None = None
    original_size: Sequence[int] | None = None
    crops_coords_top_left: Sequence[int] | None = None
    target_size: Sequence[int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    high_noise_frac: float | None = None

    @property
    def batch_size(self) -> int:
        """Prompts, each giving num_images_per_prompt images."""
        return len(self.prompt)

    @property
    def do_classifier_free_guidance(self) -> bool:
        # As diffusers: guidance 1 (or less) needs no unconditional pass; every family's default guides.
        return self.guidance_scale is None or self.guidance_scale > 1.0

    @property
    def adapters(self) -> tuple[tuple[str, float], ...]:
        """The LoRA adapters with their weights, as checked by check_adapters: (name, weight) pairs."""
        scales = self.lora_scale if self.lora_scale is not None else [1.0] * len(self.lora)
        return tuple(zip(self.lora, scales))

    def prompts(self, second: bool = False) -> list[str]:
        """The prompts; ``second``: SDXL's second text encoder's (prompt_2, or the prompts)."""
        return list(self.prompt_2 if second and self.prompt_2 else self.prompt)

    def negative_prompts(self, second: bool = False) -> list[str]:
        """One negative prompt per prompt ('' when none was given, as diffusers does); ``second``:
        SDXL's second text encoder's (negative_prompt_2, or those)."""
        negatives = self.negative_prompt_2 if second and self.negative_prompt_2 else self.negative_prompt
        if not negatives:
            return [""] * self.batch_size
        if len(negatives) == 1:
            return list(negatives) * self.batch_size
        return list(negatives)


REQUEST_FIELDS = {field.name for field in fields(GenerationRequest)}


def max_inference_steps(scheduler_config: dict) -> int:
    """More steps than training timesteps (less the offset) index past the schedule: PNDM with
    SD1.5's config fails at 1000 steps, inside diffusers' own pipeline too."""
    return scheduler_config.get("num_train_timesteps", 1000) - scheduler_config.get("steps_offset", 0)


def check_request(request: GenerationRequest, max_prompts: int, max_steps: int | None,
                  sizes: specs.ImageSizes | None = None) -> GenerationRequest:
    """Validate every field; return the request with its types normalized (str, float, int).
    ``max_steps=None``: no upper bound on the steps here (a client that does not know the served
    scheduler leaves that check to the server); ``sizes``: the image sizes served (None: any, a
    check left to the server)."""
    prompts = _check_texts("prompt", request.prompt, max_prompts, required=True)
    negatives = None
    if request.negative_prompt is not None and len(request.negative_prompt) > 0:
        negatives = _as_list(request.negative_prompt)
        if len(negatives) not in (1, len(prompts)):
            raise InvalidRequest(
                f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}: "
                f"send one negative prompt per prompt, or a single one for all."
            )
        negatives = _check_texts("negative_prompt", negatives, max_prompts, required=False)
    image = None if request.image is None else check_image(request.image, len(prompts), sizes)
    if request.mask_image is not None and image is None:
        raise InvalidRequest("mask_image is for inpainting, which repaints an image: send the image too, or leave "
                             "mask_image out.")
    mask = None if request.mask_image is None else check_mask(request.mask_image, image)
    request = check_options(replace(request, prompt=prompts, negative_prompt=negatives, image=image, mask_image=mask),
                            max_steps, image_to_image=image is not None, sizes=sizes)
    check_image_count(len(prompts), request.num_images_per_prompt, max_prompts)
    return request


def check_before_sending(request: GenerationRequest) -> GenerationRequest:
    """A served pipeline's client's checks: a bad value gets the server's message without a round
    trip (the server checks again, and knows the step cap and the sizes); the default guidance
    scale and image to image's strength stay the server's to choose (the served checkpoint's
    family's: utils/families.py)."""
    checked = check_request(request, max_prompts=specs.MAX_PROMPTS, max_steps=None)
    return replace(checked, **{name: None for name in ("strength", "guidance_scale") if getattr(request, name) is None})


def default_strength(inpainting: bool) -> float:
    """A request's strength where it gives none, as diffusers' image to image and inpainting
    pipelines default."""
    return DEFAULT_INPAINT_STRENGTH if inpainting else DEFAULT_STRENGTH


def check_image_count(prompts: int, images_per_prompt: int, max_prompts: int) -> None:
    """The images a request makes, against the engines' batch profiles (before any network runs)."""
    if prompts * images_per_prompt > max_prompts:
        raise InvalidRequest(
            f"{prompts} prompt(s) x num_images_per_prompt={images_per_prompt} make {prompts * images_per_prompt} "
            f"images: at most {max_prompts} per request (the engines' batch profiles); split the request.")


def check_options(request: GenerationRequest, max_steps: int | None, image_to_image: bool,
                  sizes: specs.ImageSizes | None = None) -> GenerationRequest:
    """The numeric options alone (what a step without prompts, such as denoise, receives); the
    strength only matters, and is only checked, from an image, whose size the height and width
    then are."""
    guidance = _number("guidance_scale", DEFAULT_GUIDANCE_SCALE if request.guidance_scale is None
                       else request.guidance_scale, float)
    low, high = GUIDANCE_SCALE_RANGE
    if not (math.isfinite(guidance) and low <= guidance <= high):
        raise InvalidRequest(f"guidance_scale={guidance!r} is not allowed: use a finite number in [{low:g}, {high:g}].")
    steps = _number("num_inference_steps", request.num_inference_steps, int)
    if steps < 1 or (max_steps is not None and steps > max_steps):
        allowed = f"in [1, {max_steps}]" if max_steps is not None else "of at least 1"
        raise InvalidRequest(f"num_inference_steps={steps} is not allowed: use an integer {allowed}.")
    if request.scheduler in FEW_STEP_SCHEDULERS and steps > FEW_STEP_MAX_STEPS:
        raise InvalidRequest(f"num_inference_steps={steps} is not allowed with {request.scheduler}: use at most "
                             f"{FEW_STEP_MAX_STEPS} (its schedule's original_inference_steps); few-step sampling "
                             f"takes 1 to 8.")
    cutoff = request.cfg_cutoff_step_ratio
    if cutoff is not None and request.mask_image is not None:
        raise InvalidRequest(f"cfg_cutoff_step_ratio={cutoff!r} is not allowed with a mask_image: diffusers' "
                             f"SDCFGCutoffCallback, which it follows, does not cut an inpainting request's guidance "
                             f"(its mask stays doubled); use guidance to the end (leave it out).")
    if request.mask_image is not None:  # (what a step without the image can check: check_request checks it whole)
        check_mask(request.mask_image, None)
    if cutoff is not None:
        cutoff = _number("cfg_cutoff_step_ratio", cutoff, float)
        if not (math.isfinite(cutoff) and 0 <= cutoff <= 1):
            raise InvalidRequest(f"cfg_cutoff_step_ratio={cutoff!r} is not allowed: use a fraction of the steps in "
                                 f"[0, 1] (0.4: guidance for the first 40 %), or leave it out for guidance to the end.")
    seed = request.seed
    if seed is not None:
        seed = _number("seed", seed, int)
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise InvalidRequest(f"seed={seed} is not allowed: use an integer in [0, 2**63 - 1].")
    strength = request.strength if request.strength is not None else default_strength(request.mask_image is not None)
    strength = _number("strength", strength, float)
    if image_to_image and not (math.isfinite(strength) and 0 < strength <= 1):
        raise InvalidRequest(f"strength={strength!r} is not allowed: use a number in (0, 1].")
    if image_to_image and int(steps * strength) < 1:  # diffusers' img2img keeps int(steps * strength) steps
        raise InvalidRequest(f"strength={strength:g} with num_inference_steps={steps} leaves no denoising step: "
                             f"raise strength to at least {1 / steps:g} or the steps.")
    images = _number("num_images_per_prompt", request.num_images_per_prompt, int)
    if images < 1:
        raise InvalidRequest(f"num_images_per_prompt={images} is not allowed: use an integer of at least 1.")
    if request.scheduler is not None and request.scheduler not in SCHEDULERS:
        raise InvalidRequest(f"scheduler={request.scheduler!r} is not allowed: use one of {', '.join(SCHEDULERS)} "
                             f"(or leave it out for the checkpoint's own).")
    height, width = (_check_size(name, getattr(request, name), sizes, image_to_image) for name in ("height", "width"))
    lora, lora_scale = check_adapters(request.lora, request.lora_scale)
    return replace(request, guidance_scale=guidance, cfg_cutoff_step_ratio=cutoff, num_inference_steps=steps,
                   seed=seed, strength=strength,
                   num_images_per_prompt=images, height=height, width=width, lora=lora, lora_scale=lora_scale)


def check_adapters(lora, lora_scale) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
    """The adapters' names and weights on their own (whether the deployment serves them is
    utils/lora.py's ServedAdapters.check): names well formed and distinct, one finite weight in range each."""
    names = tuple(_as_list(lora)) if lora is not None else ()
    if len(names) > MAX_LORAS:
        raise InvalidRequest(f"lora={list(names)} names {len(names)} adapters: at most {MAX_LORAS} per request; use "
                             f"fewer, or merge them into one LoRA file.")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not SERVED_NAME.match(name):
            raise InvalidRequest(f"lora[{index}]={name!r} is not an adapter name: names are lower-case letters, digits "
                                 f"and dashes: use a name the deployment serves (its --lora NAME=PATH).")
    if len(set(names)) != len(names):
        raise InvalidRequest(f"lora={list(names)} names an adapter twice: use each name once, with one weight.")
    if lora_scale is None:
        return names, None
    values = lora_scale.reshape(-1).tolist() if isinstance(lora_scale, np.ndarray) else _as_list(lora_scale)
    scales = [_number(f"lora_scale[{index}]", value, float) for index, value in enumerate(values)]
    if len(scales) != len(names):
        raise InvalidRequest(f"lora_scale={scales} has {len(scales)} value(s) for {len(names)} adapter(s) in lora: use "
                             f"one weight per adapter, in the same order (or leave lora_scale out for 1 each).")
    low, high = LORA_SCALE_RANGE
    for index, scale in enumerate(scales):
        if not (math.isfinite(scale) and low <= scale <= high):
            raise InvalidRequest(f"lora_scale[{index}]={scale!r} (for {names[index]!r}) is not allowed: use a finite "
                                 f"weight in [{low:g}, {high:g}] (1: the adapter as trained, 0: off).")
    return names, tuple(scales)


def _check_size(name: str, value, sizes: specs.ImageSizes | None, image_to_image: bool) -> int | None:
    if value is None:
        return None
    if image_to_image:
        raise InvalidRequest(f"{name}={value!r} applies to text to image: image to image keeps its image's size; "
                             f"resize the image instead, or leave {name} out.")
    size = _number(name, value, int)
    if sizes is not None and not sizes.allows(size):
        raise InvalidRequest(f"{name}={size} is not served: use {sizes.describe()} pixels. The range is the "
                             f"deployment's (--image-sizes when writing the repository; TensorRT engines are "
                             f"built for it): widen it there to serve other sizes.")
    if size < 1:
        raise InvalidRequest(f"{name}={size} is not allowed: use a positive number of pixels.")
    return size


def check_image(image, prompts: int | None, sizes: specs.ImageSizes | None, name: str = specs.INIT_IMAGE.name,
                counts: Sequence[int] | None = None) -> np.ndarray:
    """An image batch: uint8 [N, H, W, 3] (a single [H, W, 3] image is one), N = 1 or one per
    prompt (``prompts=None``: any N; ``counts``: one of these), its height and width sizes served
    (``sizes=None``: any); ``name``: the input's, for the errors."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise InvalidRequest(f"{name} is {kind}: send uint8 RGB pixels, shape [N, H, W, 3].")
    if image.ndim == 3:
        image = image[None]
    expected = "[N, H, W, 3]" + (f" (N = 1 or one per prompt: {prompts})" if prompts and not counts else
                                 f" (N = {' or '.join(map(str, counts))})" if counts else "")
    counts = counts or ((1, prompts) if prompts else range(1, image.shape[0] + 1))
    if image.ndim != 4 or image.shape[3] != 3 or image.shape[0] not in counts:
        raise InvalidRequest(f"{name} has shape {list(image.shape)}: send {expected}.")
    height, width = image.shape[1:3]
    if sizes is not None and not (sizes.allows(height) and sizes.allows(width)):
        raise InvalidRequest(f"{name} is {height}x{width} pixels (height x width): its height and width must each be "
                             f"{sizes.describe()}; resize it (the range is the deployment's --image-sizes).")
    return image


def request_to_arrays(request: GenerationRequest, spec: specs.PipelineSpec = specs.TEXT_TO_IMAGE) -> dict[str, np.ndarray]:
    """The input tensors of a pipeline model for ``request``; its fields are named as the inputs."""
    arrays = {}
    for tensor in spec.inputs:
        value = getattr(request, tensor.name) if tensor.name in REQUEST_FIELDS else None  # not: preview_every
        if value is None or (tensor.optional and isinstance(value, (list, tuple)) and not value):  # lora=()
            continue
        if isinstance(value, np.ndarray):
            arrays[tensor.name] = np.ascontiguousarray(value)
            continue
        values = [v.encode("utf-8") if isinstance(v, str) else v for v in _as_list(value)]
        arrays[tensor.name] = np.array(values, dtype=triton_to_np_dtype(tensor.dtype))
    return arrays


def request_from_arrays(arrays: Mapping[str, np.ndarray | None],
                        spec: specs.PipelineSpec = specs.TEXT_TO_IMAGE) -> GenerationRequest:
    """Build a request from the input tensors of a pipeline model (those named as request fields).

    Values are not range-checked here: check_request does that for every pipeline.
    """
    fields_ = {}
    for tensor in spec.inputs:
        if tensor.name not in REQUEST_FIELDS:  # a step's tensor (text embeddings, ...), not an option
            continue
        array = arrays.get(tensor.name)
        if array is None:
            if not tensor.optional:
                raise InvalidRequest(f"{tensor.name} is required: send a {tensor.dtype} tensor of shape {list(tensor.dims)}.")
        elif tensor.dtype == "BYTES":
            texts = _decode(tensor.name, array)
            if tensor.dims == (1,) and len(texts) != 1:
                raise InvalidRequest(f"{tensor.name} has {len(texts)} values: send exactly one, shape [1].")
            fields_[tensor.name] = texts[0] if tensor.dims == (1,) else texts
        elif tensor.dims == (1,):
            if array.size != 1:
                raise InvalidRequest(f"{tensor.name} has {array.size} values: send exactly one, shape [1].")
            fields_[tensor.name] = _as_sent(array.reshape(-1)[0])
        elif array.dtype == np.float32:  # lora_scale: each weight as sent
            fields_[tensor.name] = [_as_sent(value) for value in array.reshape(-1)]
        else:
            fields_[tensor.name] = array
    return GenerationRequest(**fields_)


def _as_sent(value: np.generic):
    """A tensor's number as the client wrote it: an FP32 value as the shortest decimal that gives
    it (0.7, not 0.699999988), so that a strength of 0.7 keeps int(10 x 0.7) = 7 of 10 steps here
    as it does in the client-side loop and in diffusers."""
    return float(repr(value)) if isinstance(value, np.float32) else value.item()


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _decode(name: str, array: np.ndarray) -> list[str]:
    texts = []
    for index, item in enumerate(array.reshape(-1)):
        raw = item if isinstance(item, bytes) else str(item).encode()
        if len(raw) > MAX_PROMPT_BYTES:
            raise InvalidRequest(f"{name}[{index}] has {len(raw)} bytes: the limit is {MAX_PROMPT_BYTES} bytes.")
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InvalidRequest(
                f"{name}[{index}] is not valid UTF-8 (byte {raw[error.start]:#04x} at position {error.start}): "
                f"send text encoded as UTF-8."
            ) from None
    return texts


def _check_texts(name: str, texts, max_count: int, required: bool) -> list[str]:
    texts = _as_list(texts)
    if required and not texts:
        raise InvalidRequest(f"{name} is empty: send 1 to {max_count} prompts.")
    if len(texts) > max_count:
        raise InvalidRequest(
            f"{name} has {len(texts)} entries: at most {max_count} per request (the engines' batch profiles); "
            f"split the request."
        )
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidRequest(f"{name}[{index}] is {type(text).__name__}, not text: send strings.")
        if len(text.encode("utf-8")) > MAX_PROMPT_BYTES:
            raise InvalidRequest(f"{name}[{index}] is longer than {MAX_PROMPT_BYTES} UTF-8 bytes: shorten it.")
    return texts


def _number(name: str, value, kind: type):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InvalidRequest(f"{name}={value!r} is not a number.")
    if kind is int and isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise InvalidRequest(f"{name}={value!r} is not an integer.")
    return kind(value)
