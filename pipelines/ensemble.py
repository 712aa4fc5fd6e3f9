"""Client of the Triton ensembles (triton/models/ensemble_text_to_image, ensemble_image_to_image,
ensemble_inpaint and ensemble_controlnet).

An ensemble is a data-flow graph that Triton runs itself: each step's outputs become the next
steps' inputs, with no client round trip between them. Its steps are ensembles too
(encode_prompt, encode_image, decode) around the one step that loops: denoise, a Python model
that calls the UNet by BLS. From a client it is one request, like the BLS pipeline.

Triton hands an ensemble request's parameters to every step, so a request's LoRA adapters go as
the request parameter ``lora`` too: the text encoder step, which applies them in place on the
torch runtime, reads them there (the ensemble's first step checks that they match the inputs).
"""

from __future__ import annotations

from pipelines.served import ServedPipeline
from utils import specs
from utils.lora import REQUEST_PARAMETER, encode_adapters
from utils.request import GenerationRequest


class EnsemblePipeline(ServedPipeline):
    text_to_image = specs.ENSEMBLE_TEXT_TO_IMAGE
    image_to_image = specs.ENSEMBLE_IMAGE_TO_IMAGE
    inpaint = specs.ENSEMBLE_INPAINT
    controlnet = specs.ENSEMBLE_CONTROLNET

    def parameters(self, request: GenerationRequest) -> dict[str, str]:
        return {REQUEST_PARAMETER: encode_adapters(request.adapters)} if request.adapters else {}
