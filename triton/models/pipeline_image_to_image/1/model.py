"""Server-side image to image (BLS): the text-to-image loop, started from the VAE encoder's
latents of the request's image, noised to its ``strength`` (as StableDiffusionImg2ImgPipeline).
"""

from utils import specs
from utils.python_backend.pipeline_model import PipelineModel


class TritonPythonModel(PipelineModel):
    spec = specs.IMAGE_TO_IMAGE

    def prepare(self):
        self.pipeline.warm_up()  # so that the first request does not pay for lazy initialization

    def run(self, request, tensors, is_cancelled):
        return (self.pipeline(request, is_cancelled=is_cancelled),)
