"""Server-side image to image (BLS): the text-to-image loop, started from the VAE encoder's
latents of the request's image, noised to its ``strength`` (as StableDiffusionImg2ImgPipeline).
Given a ``mask_image`` too, it inpaints: the loop repaints the white part of the mask (as
StableDiffusionInpaintPipeline, pipelines/inpainting.py).
"""

from pipelines.python_model import BlsPipelineModel
from utils import specs


class TritonPythonModel(BlsPipelineModel):
    spec = specs.IMAGE_TO_IMAGE
