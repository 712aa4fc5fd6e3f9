"""Ensemble step: uint8 RGB images [N, H, W, 3] -> the VAE encoder's input, [N, 3, H, W] in [-1, 1]."""

from utils import specs
from utils.python_backend.pipeline_model import PipelineModel


class TritonPythonModel(PipelineModel):
    spec = specs.PREPROCESS_IMAGE
    required = (specs.INIT_IMAGE,)

    def run(self, request, tensors, is_cancelled):
        return (self.pipeline.preprocess_image(self.pipeline.check_image(request.image)),)
