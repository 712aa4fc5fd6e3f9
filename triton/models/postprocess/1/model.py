"""Ensemble step: the VAE decoder's image in [-1, 1] -> uint8 RGB; an image that is not finite,
or one flat colour, is an error, never a blank picture sent as a success."""

from pipelines.python_model import PipelineModel
from utils import specs

(DECODED,) = (tensor.name for tensor in specs.POSTPROCESS.inputs)


class TritonPythonModel(PipelineModel):
    spec = specs.POSTPROCESS

    def compute(self, request, tensors, is_cancelled):
        return (self.pipeline.postprocess(tensors[DECODED]),)
