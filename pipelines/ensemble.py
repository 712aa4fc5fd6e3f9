"""Client of the Triton ensembles (triton/models/ensemble_text_to_image and ensemble_image_to_image).

An ensemble is a data-flow graph that Triton runs itself: each step's outputs become the next
steps' inputs, with no client round trip between them. Its steps are ensembles too
(encode_prompt, encode_image, decode) around the one step that loops: denoise, a Python model
that calls the UNet by BLS. From a client it is one request, like the BLS pipeline.
"""

from __future__ import annotations

from pipelines.served import ServedPipeline
from utils import specs


class EnsemblePipeline(ServedPipeline):
    text_to_image = specs.ENSEMBLE_TEXT_TO_IMAGE
    image_to_image = specs.ENSEMBLE_IMAGE_TO_IMAGE
