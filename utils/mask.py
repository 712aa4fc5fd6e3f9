"""The inpainting mask a request sends: what is allowed (``check_mask``), and a simple one to
send (``box_mask``). White (MASK_THRESHOLD and up) repaints, black keeps, as diffusers' mask
processor binarizes at 0.5; pipelines/inpainting.py applies it in the loop."""

from __future__ import annotations

import numpy as np

from utils.errors import InvalidRequest

MASK_THRESHOLD = 128  # a mask's grey levels from this one up repaint (diffusers binarizes at 0.5)


def check_mask(mask, image: np.ndarray | None) -> np.ndarray:
    """An inpainting mask batch: uint8 [N, H, W] (a single [H, W] mask is one), white (from
    MASK_THRESHOLD up) where to repaint, N = 1 or one per image, the image's size (``image=None``:
    a step that has the image's latents only checks its own shape). Each mask must keep a part and
    repaint a part: all black repaints nothing, all white keeps nothing of the image."""
    expected = "uint8 grey levels, shape [N, H, W], white where to repaint"
    if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8:
        kind = mask.dtype if isinstance(mask, np.ndarray) else type(mask).__name__
        raise InvalidRequest(f"mask_image is {kind}: send {expected}.")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or 0 in mask.shape:
        raise InvalidRequest(f"mask_image has shape {list(mask.shape)}: send {expected}.")
    if image is not None and (mask.shape[1:] != image.shape[1:3] or mask.shape[0] not in (1, image.shape[0])):
        raise InvalidRequest(f"mask_image has shape {list(mask.shape)} for an image of shape {list(image.shape)}: send "
                             f"one mask of the image's height and width, [1, {image.shape[1]}, {image.shape[2]}], or "
                             f"one per image.")
    repainted = (mask >= MASK_THRESHOLD).reshape(mask.shape[0], -1).mean(axis=1)
    for index, fraction in enumerate(repainted):
        if fraction == 0:
            raise InvalidRequest(f"mask_image[{index}] is black everywhere: nothing to repaint. Paint white (grey "
                                 f"levels of {MASK_THRESHOLD} and up) where the image should change.")
        if fraction == 1:
            raise InvalidRequest(f"mask_image[{index}] is white everywhere: nothing of the image is kept. Paint black "
                                 f"what to keep, or leave mask_image out (image to image, or text to image).")
    return mask


def box_mask(height: int, width: int, box: tuple[float, float, float, float] = (0.25, 0.25, 0.75, 0.75)):
    """A mask [1, H, W] that repaints one rectangle, given as fractions (top, left, bottom, right)
    of the image: the demo's, and a start for a client's own."""
    mask = np.zeros((1, height, width), dtype=np.uint8)
    top, left, bottom, right = box
    mask[:, round(top * height):round(bottom * height), round(left * width):round(right * width)] = 255
    return mask
