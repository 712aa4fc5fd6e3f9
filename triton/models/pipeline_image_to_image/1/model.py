"""Server-side image to image (BLS): the text-to-image loop, started from the VAE encoder's
latents of the request's image, noised to its ``strength`` (as StableDiffusionImg2ImgPipeline).
"""

from utils import specs
from utils.python_backend.pipeline_model import BlsPipelineModel


class TritonPythonModel(BlsPipelineModel):
    spec = specs.IMAGE_TO_IMAGE
