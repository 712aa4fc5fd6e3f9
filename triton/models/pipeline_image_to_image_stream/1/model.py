"""Server-side image to image with live progress: the BLS loop of pipeline_image_to_image as a decoupled
(streaming) model, previews every ``preview_every`` steps, then the images
(pipelines/python_model.py's StreamingPipelineModel).
"""

from pipelines.python_model import StreamingPipelineModel
from utils import specs


class TritonPythonModel(StreamingPipelineModel):
    spec = specs.IMAGE_TO_IMAGE_STREAM
