"""ControlNet: what the loop adds to text to image when a request has a ``control_image``.

At each step, before the UNet, each ControlNet the request names sees the UNet's own inputs (the
scaled latents, the timesteps, the text embeddings) and its control image, and returns residuals
for the UNet's skip connections; they are weighted (``controlnet_conditioning_scale``), summed
over the ControlNets, and the UNet that adds them (``controlled_unet``) runs instead of the plain
one. Outside a ControlNet's fraction of the steps (``control_guidance_start``/``_end``) its weight
is 0 and it is not called; a step with none left runs the plain UNet. Same seed, same image as
diffusers' ``StableDiffusionControlNetPipeline``, which weights, sums and keeps them the same way.
"""

from __future__ import annotations

import torch

from utils import specs
from utils.controlnet import prepared
from utils.request import GenerationRequest


class Control:
    """One request's ControlNets through its loop: each one's served model, its control image (RGB
    in [0, 1], a row per image made) and its weight at each step."""

    def __init__(self, request: GenerationRequest, batch: int, steps: int, dtype: torch.dtype,
                 device: torch.device):
        """``request``: as utils/controlnet.py's check_control returns it; ``batch``: the images
        made; ``steps``: the loop's timesteps."""
        images = prepared(request.control_image, request.control_mode)  # a photo's edges made here, for instance
        pixels = torch.as_tensor(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0  # as diffusers' processor
        self.images = [image[None].repeat(batch, 1, 1, 1).to(device=device, dtype=dtype) for image in pixels]
        self._rows: dict[tuple[int, int], torch.Tensor] = {}  # (ControlNet, guidance rows): its images, made once
        self.models = [specs.controlnet_model(name) for name in request.controlnet]
        # Each ControlNet's weight at each step: 0 outside its fraction of the steps (diffusers' controlnet_keep).
        self.weights = [[scale * (1.0 - float(done / steps < start or (done + 1) / steps > end))
                         for scale, start, end in zip(request.controlnet_conditioning_scale,
                                                      request.control_guidance_start, request.control_guidance_end)]
                        for done in range(steps)]

    def residuals(self, call_network, done: int, model_input: torch.Tensor, timestep: torch.Tensor,
                  text_embeddings: torch.Tensor) -> torch.Tensor | None:
        """The weighted sum of the residuals of the ControlNets that act at step ``done`` (None: none
        does), for a UNet call with these inputs (a control image per row: guidance doubles them)."""
        total = None
        for index, (model, weight) in enumerate(zip(self.models, self.weights[done])):
            if weight == 0:
                continue
            (residuals,) = call_network(model, model_input, timestep, text_embeddings,
                                        self._control_images(index, model_input.shape[0]))
            if weight != 1:  # (at 1, a copy of many megabytes for nothing)
                residuals = residuals * weight
            total = residuals if total is None else total + residuals
        return total

    def _control_images(self, index: int, rows: int) -> torch.Tensor:
        """ControlNet ``index``'s images for a call of ``rows`` rows: guidance doubles them."""
        if (index, rows) not in self._rows:
            image = self.images[index]
            self._rows[index, rows] = image.repeat(rows // image.shape[0], 1, 1, 1)
        return self._rows[index, rows]
