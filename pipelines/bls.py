"""Client of the server-side BLS pipelines (triton/models/pipeline_text_to_image and
pipeline_image_to_image, which inpaints given a mask_image).

One gRPC request carries the prompts and settings; the whole loop runs inside Triton, where
the networks are called as BLS sub-requests with tensors passed by DLPack.
"""

from __future__ import annotations

from pipelines.served import ServedPipeline
from utils import specs


class BlsPipeline(ServedPipeline):
    text_to_image = specs.TEXT_TO_IMAGE
    image_to_image = specs.IMAGE_TO_IMAGE
    inpaint = specs.IMAGE_TO_IMAGE  # the same model: image to image with a mask_image
    controlnet = specs.TEXT_TO_IMAGE  # the same model: text to image with a control_image
