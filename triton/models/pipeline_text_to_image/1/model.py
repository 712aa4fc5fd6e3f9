"""Server-side text to image (BLS): the whole loop runs inside Triton, one request per image set.

The shared loop (pipelines/stable_diffusion.py) calls each network as a BLS sub-request, tensors
passed by DLPack; utils/python_backend/pipeline_model.py reads the request, packs the image and
turns every failure into a per-request error.
"""

from utils import specs
from utils.python_backend.pipeline_model import PipelineModel


class TritonPythonModel(PipelineModel):
    spec = specs.TEXT_TO_IMAGE

    def prepare(self):
        self.pipeline.warm_up()  # so that the first request does not pay for lazy initialization

    def run(self, request, tensors, is_cancelled):
        return (self.pipeline(request, is_cancelled=is_cancelled),)
