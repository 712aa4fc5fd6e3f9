"""Ensemble step: uint8 RGB images [N, H, W, 3] -> the VAE encoder's input, [N, 3, H, W] in [-1, 1]."""

from pipelines.request import check_image
from utils import specs
from utils.python_backend.pipeline_model import PipelineModel


class TritonPythonModel(PipelineModel):
    spec = specs.PREPROCESS_IMAGE
    required = (specs.INIT_IMAGE,)

    def run(self, request, tensors, is_cancelled):
        dims = self.pipeline.components.dims
        images = check_image(request.image, None, (dims.image_height, dims.image_width))
        return (self.pipeline.preprocess_image(images),)
