"""Server-side text to image (BLS): the whole loop runs inside Triton, one request per image set.

The shared loop (pipelines/stable_diffusion.py) calls each network as a BLS sub-request, tensors
passed by DLPack; pipelines/python_model.py reads the request, packs the image and
turns every failure into a per-request error.
"""

from pipelines.python_model import BlsPipelineModel
from utils import specs


class TritonPythonModel(BlsPipelineModel):
    spec = specs.TEXT_TO_IMAGE
