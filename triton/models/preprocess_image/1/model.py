"""Ensemble step: uint8 RGB images [N, H, W, 3] -> the VAE encoder's input, [N, 3, H, W] in [-1, 1]."""

from pipelines.python_model import PipelineModel
from utils import specs


class TritonPythonModel(PipelineModel):
    spec = specs.PREPROCESS_IMAGE
    required = (specs.INIT_IMAGE,)

    def compute(self, request, tensors, is_cancelled):
        return (self.pipeline.preprocess_image(self.pipeline.check_image(request.image)),)
