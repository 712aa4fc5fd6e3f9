"""Client of the Triton ensembles (triton/models/ensemble_text_to_image, ensemble_image_to_image and
ensemble_inpaint; where served, ensemble_controlnet and SDXL's ensemble_text_to_image_refined).

An ensemble is a data-flow graph that Triton runs itself: each step's outputs become the next
steps' inputs, with no client round trip between them. Its steps are ensembles too
(encode_prompt, encode_image, decode) around the one step that loops: denoise, a Python model
that calls the UNet by BLS. From a client it is one request, like the BLS pipeline.

SDXL's base then refiner (a request with high_noise_frac) is an ensemble of its own,
ensemble_text_to_image_refined: an ensemble cannot choose its steps by a request's value.

Triton hands an ensemble request's parameters to every step, so a request's LoRA adapters go as
the request parameter ``lora`` too: the text encoder step, which applies them in place on the
torch runtime, reads them there (the ensemble's first step checks that they match the inputs).
"""

from __future__ import annotations

from pipelines.served import ServedPipeline
from utils import specs
from utils.lora import REQUEST_PARAMETER, encode_adapters
from utils.request import GenerationRequest
from utils.sdxl_ensembles import ENSEMBLE_TEXT_TO_IMAGE_REFINED


class EnsemblePipeline(ServedPipeline):
    text_to_image = specs.ENSEMBLE_TEXT_TO_IMAGE
    image_to_image = specs.ENSEMBLE_IMAGE_TO_IMAGE
    inpaint = specs.ENSEMBLE_INPAINT
    controlnet = specs.ENSEMBLE_CONTROLNET
    text_to_image_refined = ENSEMBLE_TEXT_TO_IMAGE_REFINED  # SDXL's base then refiner

    def model_for(self, request: GenerationRequest) -> specs.EnsembleSpec:
        if request.high_noise_frac is not None and request.image is None and request.control_image is None:
            return self.text_to_image_refined
        return super().model_for(request)

    def parameters(self, request: GenerationRequest) -> dict[str, str]:
        return {REQUEST_PARAMETER: encode_adapters(request.adapters)} if request.adapters else {}
