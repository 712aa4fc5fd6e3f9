"""Ensemble step, the first: the whole request checked as the BLS pipelines check it (the same
function, pipelines/stable_diffusion.py), before any network runs. Its prompt, and the image of
image to image, go on to the other steps from here, so a refused request costs no network call."""

from pipelines.python_model import PipelineModel
from utils import specs
from utils.request import InvalidRequest


class TritonPythonModel(PipelineModel):
    spec = specs.CHECK_REQUEST
    required = (specs.PROMPT,)

    def compute(self, request, tensors, is_cancelled):
        image_to_image = specs.CHECKED_IMAGE.name in self.requested_outputs()  # the image to image ensemble
        if image_to_image and request.image is None:
            raise InvalidRequest(f"{specs.INIT_IMAGE.name} is required: send a {specs.INIT_IMAGE.dtype} tensor of "
                                 f"shape {list(specs.INIT_IMAGE.dims)}.")
        checked = self.pipeline.check(request)
        return checked.prompt, checked.image  # (the response carries the outputs asked for only)
