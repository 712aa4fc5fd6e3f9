"""Ensemble step, ControlNet's branch: the control images, uint8 RGB [K, H, W, 3], as the
ControlNets take them: made from photos where control_mode asks (canny: their edges, with OpenCV),
as sent otherwise. The denoise step then takes them as they come from here."""

from pipelines.python_model import PipelineModel
from utils import specs
from utils.controlnet import control_modes, prepared


class TritonPythonModel(PipelineModel):
    spec = specs.PREPROCESS_CONTROL
    required = (specs.CONTROL_IMAGE,)

    def compute(self, request, tensors, is_cancelled):
        images = self.pipeline.check_image(request.control_image, name=specs.CONTROL_IMAGE.name)
        return (prepared(images, control_modes(request.control_mode, len(images))),)
