"""OpenAI's images API, translated: its requests into the project's GenerationRequest, the images
back into its responses, and every refusal into its error format. No web framework here: the
gateway (pipelines/openai_gateway.py) serves these over HTTP and calls Triton.

What maps to what:
- ``prompt``, ``n`` (num_images_per_prompt), ``size`` ("WxH", a size the deployment serves),
  ``response_format`` (``b64_json``: PNG in base64; there is no file server for ``url``),
  ``quality`` (steps: low 20, medium 30, high/hd/standard/auto the default 50), ``stream`` with
  ``partial_images`` (0-3 previews before the image, as OpenAI streams them);
- the edits' ``image`` and ``mask`` (OpenAI's convention: the mask's transparent pixels are the
  ones to repaint; a mask without transparency is read as diffusers' white-repaints grey mask):
  image to image, or inpainting with a mask;
- the project's own options as documented extensions, with diffusers' names: negative_prompt,
  num_inference_steps, guidance_scale, seed, scheduler, strength, clip_skip, lora, lora_scale,
  cfg_cutoff_step_ratio.
"""

from __future__ import annotations

import base64
import io
import re
import time
from dataclasses import dataclass

import numpy as np

from utils import specs
from utils.request import DEFAULT_NUM_INFERENCE_STEPS, GenerationRequest, InvalidRequest, check_request

# The edits' files, named as diffusers names its arguments: the picture, and where to repaint.
IMAGE, MASK = specs.INIT_IMAGE.name, "mask"
MAX_PARTIAL_IMAGES = 3  # as OpenAI's API
QUALITY_STEPS = {"low": 20, "medium": 30, "high": DEFAULT_NUM_INFERENCE_STEPS, "standard": DEFAULT_NUM_INFERENCE_STEPS,
                 "hd": DEFAULT_NUM_INFERENCE_STEPS, "auto": DEFAULT_NUM_INFERENCE_STEPS}
EXTENSIONS = {"negative_prompt": str, "num_inference_steps": int, "guidance_scale": float, "seed": int,
              "scheduler": str, "strength": float, "clip_skip": int, "lora": list, "lora_scale": list,
              "cfg_cutoff_step_ratio": float}
# Accepted and ignored: what OpenAI's clients send about models this is not (a style, a background).
IGNORED = {"user", "style", "background", "moderation", "output_compression", "safety_identifier",
           "input_fidelity"}


class OpenAIError(Exception):
    """A refusal, as OpenAI's API answers it: an HTTP status and {"error": {...}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def invalid(cls, error: Exception) -> OpenAIError:
        """The project's own refusal (its message names the input first) as a 400."""
        name = re.match(r"\w+", str(error))
        return cls(400, str(error), param=name[0] if name else None)


@dataclass(frozen=True)
class Served:
    """What the gateway serves: the model id it lists, the sizes, the checkpoint's own size."""

    model: str
    sizes: specs.ImageSizes
    default_size: tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Generation:
    """A request to make, and how to answer it."""

    request: GenerationRequest
    size: str  # "WxH", as the response says it
    stream: bool = False
    partial_images: int = 0


def generation(body: dict, served: Served, image: np.ndarray | None = None,
               mask: np.ndarray | None = None) -> Generation:
    """The request an OpenAI body asks for (JSON for generations, form fields for edits), checked
    as the pipelines check it: a refusal here costs Triton nothing."""
    unknown = sorted(set(body) - {"model", "prompt", "n", "size", "response_format", "quality", "stream",
                                  "partial_images", *EXTENSIONS, *IGNORED, IMAGE, MASK})
    if unknown:
        raise OpenAIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    if body.get("response_format", "b64_json") != "b64_json":
        raise OpenAIError(400, f"response_format={body['response_format']!r} is not supported: this gateway answers "
                               f"b64_json only (it keeps no files to link to).", param="response_format")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise OpenAIError(400, "prompt is required: send the text of the image to make.", param="prompt")
    options = {name: _extension(name, body[name]) for name in EXTENSIONS if body.get(name) is not None}
    quality = body.get("quality") or "auto"
    if quality not in QUALITY_STEPS:
        raise OpenAIError(400, f"quality={quality!r} is not allowed: use one of {', '.join(QUALITY_STEPS)}.",
                          param="quality")
    options.setdefault("num_inference_steps", QUALITY_STEPS[quality])
    if body.get("model") not in (None, served.model):
        raise OpenAIError(404, f"The model {body['model']!r} does not exist: this gateway serves {served.model!r} "
                               f"(GET /v1/models).", param="model", code="model_not_found")
    n = _integer("n", body.get("n", 1))
    height, width = parse_size(body.get("size"), served, image)
    if image is None:
        options.update(height=height, width=width)
    else:
        options.update(image=image, mask_image=mask)
    try:
        request = check_request(GenerationRequest(prompt=[prompt], num_images_per_prompt=n, **options),
                                max_prompts=specs.MAX_PROMPTS, max_steps=None, sizes=served.sizes)
    except InvalidRequest as error:
        if "num_images_per_prompt" in str(error):
            raise OpenAIError(400, f"n={n} is not allowed: at most {specs.MAX_PROMPTS} images per request.",
                              param="n") from None
        raise OpenAIError.invalid(error) from None
    partial = _integer("partial_images", body.get("partial_images", 0))
    if not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise OpenAIError(400, f"partial_images={partial} is not allowed: use 0 to {MAX_PARTIAL_IMAGES}.",
                          param="partial_images")
    return Generation(request, f"{width}x{height}", _boolean("stream", body.get("stream", False)), partial)


def parse_size(size, served: Served, image: np.ndarray | None) -> tuple[int, int]:
    """(height, width) from "WxH"; an edit keeps its image's size (a size, if sent, must be it)."""
    sizes = served.sizes
    if image is not None and size in (None, "auto"):
        return image.shape[-3], image.shape[-2]
    if size in (None, "auto"):
        return served.default_size
    match = re.fullmatch(r"(\d+)x(\d+)", str(size))
    if match is None:
        raise OpenAIError(400, f"size={size!r} is not a size: send \"WIDTHxHEIGHT\" in pixels, each "
                               f"{sizes.describe()}.", param="size")
    width, height = int(match[1]), int(match[2])
    if not (sizes.allows(width) and sizes.allows(height)):
        raise OpenAIError(400, f"size={size!r} is not served: each side {sizes.describe()} pixels.", param="size")
    if image is not None and (height, width) != image.shape[-3:-1]:
        raise OpenAIError(400, f"size={size!r} is not the image's ({image.shape[-2]}x{image.shape[-3]}): an edit "
                               f"keeps its image's size; leave size out.", param="size")
    return height, width


def decode_image(data: bytes, name: str) -> np.ndarray:
    """An uploaded picture as uint8 RGBA [H, W, 4]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as picture:
            return np.asarray(picture.convert("RGBA"))
    except (UnidentifiedImageError, OSError, ValueError):
        raise OpenAIError(400, f"{name} is not an image: send a PNG, JPEG or WebP file.", param=name) from None


def edit_inputs(image: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The image as RGB [1, H, W, 3], and the mask as the pipelines take it ([1, H, W], white where to
    repaint): OpenAI's mask repaints where it is transparent; one with no transparency, where it is white."""
    rgb = image[None, ..., :3].copy()
    if mask is None:
        return rgb, None
    if mask.shape[:2] != image.shape[:2]:
        raise OpenAIError(400, f"mask is {mask.shape[1]}x{mask.shape[0]}, the image {image.shape[1]}x"
                               f"{image.shape[0]}: send a mask of the image's size.", param="mask")
    alpha = mask[..., 3]
    repaint = alpha == 0 if (alpha < 255).any() else mask[..., :3].mean(axis=-1) >= 128
    return rgb, np.where(repaint, 255, 0).astype(np.uint8)[None]


def png(image: np.ndarray) -> bytes:
    """uint8 RGB (or grey) [H, W(, 3)] as a PNG file's bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png(image)).decode()


def from_png_base64(text: str) -> np.ndarray:
    """What a client gets back: a b64_json image as uint8 RGB [H, W, 3]."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as picture:
        return np.asarray(picture.convert("RGB"))


def images_response(images: np.ndarray, size: str, truncated: list[str]) -> dict:
    """OpenAI's ImagesResponse; the text cut from a long prompt as revised_prompt's note."""
    cut = next((text for text in truncated if text), "")
    return {"created": int(time.time()), "output_format": "png", "size": size,
            "data": [{"b64_json": png_base64(image), **({"revised_prompt": f"(cut: {cut})"} if cut else {})}
                     for image in images]}


def stream_event(kind: str, image: np.ndarray, size: str, index: int | None = None) -> dict:
    """One of OpenAI's image streaming events: a partial image, or the completed one."""
    event = {"type": f"image_generation.{kind}", "b64_json": png_base64(image), "created_at": int(time.time()),
             "size": size, "quality": "auto", "background": "opaque", "output_format": "png"}
    if index is not None:
        event["partial_image_index"] = index
    if kind == "completed":
        event["usage"] = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                          "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}
    return event


def _extension(name: str, value):
    kind = EXTENSIONS[name]
    if kind is list:
        return value if isinstance(value, list) else [value]
    if kind is int:
        return _integer(name, value)
    if kind is float and not isinstance(value, bool):
        try:
            return float(value)  # a number, or a form field's text
        except (TypeError, ValueError):
            pass
    if kind is str and isinstance(value, str):
        return value
    raise OpenAIError(400, f"{name}={value!r} is not a {kind.__name__}.", param=name)


def _boolean(name: str, value) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):  # a form field
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise OpenAIError(400, f"{name}={value!r} is not a boolean: send true or false.", param=name)
    return value


def _integer(name: str, value) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():  # a form field
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OpenAIError(400, f"{name}={value!r} is not an integer.", param=name)
    return value
