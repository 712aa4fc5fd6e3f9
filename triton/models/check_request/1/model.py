"""Ensemble step, the first: the whole request checked as the BLS pipelines check it (the same
function, pipelines/stable_diffusion.py), before any network runs. Its prompt, the image of image
to image, the mask of inpainting, ControlNet's control images and SDXL's high_noise_frac (base then
refiner) go on to the other steps from here, so a refused request costs no network call."""

from pipelines.python_model import PipelineModel
from utils import specs
from utils.lora import REQUEST_PARAMETER, decode_adapters, encode_adapters
from utils.request import InvalidRequest
from utils.sdxl_ensembles import CHECKED_HIGH_NOISE_FRAC, ENSEMBLE_TEXT_TO_IMAGE_REFINED  # SDXL's base then refiner


class TritonPythonModel(PipelineModel):
    spec = specs.CHECK_REQUEST
    required = (specs.PROMPT,)

    def compute(self, request, tensors, is_cancelled):
        requested = self.requested_outputs()  # the image to image, inpainting, ... ensembles ask for these
        for output, tensor in ((specs.CHECKED_IMAGE, specs.INIT_IMAGE), (specs.CHECKED_MASK, specs.MASK_IMAGE),
                               (specs.CHECKED_CONTROL_IMAGE, specs.CONTROL_IMAGE),
                               (CHECKED_HIGH_NOISE_FRAC, specs.HIGH_NOISE_FRAC)):
            if output.name in requested and getattr(request, tensor.name) is None:
                raise InvalidRequest(f"{tensor.name} is required: send a {tensor.dtype} tensor of shape "
                                     f"{list(tensor.dims)}.")
        if request.high_noise_frac is not None and self.pipeline.refiner is not None and \
                CHECKED_HIGH_NOISE_FRAC.name not in requested:  # an ensemble of the base alone
            raise InvalidRequest(f"high_noise_frac={request.high_noise_frac!r}: this ensemble runs SDXL's base alone; "
                                 f"send the request to {ENSEMBLE_TEXT_TO_IMAGE_REFINED.name} (text to image), to "
                                 f"{specs.IMAGE_TO_IMAGE.name} (BLS) for image to image, or leave it out.")
        checked = self.pipeline.check(request)
        self.pipeline.check_unet_kind(checked)
        if self.adapters.in_place:
            self.check_adapters_parameter(checked.adapters)
        # (the response carries the outputs asked for only)
        return checked.prompt, checked.image, checked.mask_image, checked.control_image, checked.high_noise_frac

    def check_adapters_parameter(self, adapters) -> None:
        """Adapters applied in place: the text encoder step reads them from the request parameter
        (Triton hands it to every step), which must name the same adapters and weights as the inputs
        (none: neither names any)."""
        text = self._request.parameters.get(REQUEST_PARAMETER, "")
        try:
            sent = decode_adapters(text)
        except ValueError:
            sent = None
        same = sent is not None and len(sent) == len(adapters) and all(
            name == other and abs(weight - other_weight) <= 1e-6 * max(1.0, abs(weight))
            for (name, weight), (other, other_weight) in zip(sent, adapters))
        if not same:
            fix = (f"send parameters={{{REQUEST_PARAMETER!r}: {encode_adapters(adapters)!r}}} with the inputs"
                   if adapters else "leave the parameter out, or name the adapters in the inputs too")
            raise InvalidRequest(f"lora={[name for name, _ in adapters]} with the request parameter "
                                 f"{REQUEST_PARAMETER}={text!r}: the text encoder applies adapters in place, and an "
                                 f"ensemble's text encoder step reads them from that parameter: {fix} "
                                 f"(EnsemblePipeline sends both).")
