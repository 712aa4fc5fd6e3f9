"""SDXL's ensembles: SD1.x's graphs (utils/specs.py) with what SDXL adds flowing through them.

The models keep their names (a repository serves one family: utils/families.py), and their
contracts gain SDXL's tensors:

- ``tokenizer`` plans the rows of both text encoders (the second's as ``input_ids_2``, ...);
- ``encode_prompt`` = tokenizer -> text_encoder and text_encoder_2 (side by side) -> prompt_embeds,
  which also answers the pooled text (``pooled_embeddings``);
- ``denoise`` takes the pooled text and the size conditions, and makes the time ids;
- text to image and image to image: check_request -> encode_prompt (, encode_image) -> denoise -> decode.

Inpainting and ControlNet are SD1.x's, and so are their ensembles. Base then refiner runs in the
BLS pipelines; its ensemble of ensembles is not built yet, so the ensembles' first step refuses
high_noise_frac by name.
"""

from __future__ import annotations

from dataclasses import replace

from utils import specs
from utils.families import TEXT_ENCODER_2, TEXT_EMBEDS
from utils.spec_types import ACTIVATION, TensorSpec
from utils.specs import EnsembleSpec, batched, step

# What flows between the steps, besides SD1.x's: the second text encoder's rows and what it encodes.
ROWS_2 = tuple(batched(t, f"{t.name}_2") for t in TEXT_ENCODER_2.inputs)
ENCODED_ROWS_2 = batched(TEXT_ENCODER_2.outputs[0], f"{TEXT_ENCODER_2.outputs[0].name}_2")
POOLED_ROWS = batched(TEXT_EMBEDS)  # the second text encoder's pooled output, a row per row
POOLED_EMBEDDINGS = TensorSpec("pooled_embeddings", ACTIVATION, (-1, *TEXT_EMBEDS.dims))  # a row per text
_PROMPTS_2 = (specs.PROMPT_2, specs.NEGATIVE_PROMPT_2)
_SIZES = (specs.ORIGINAL_SIZE, specs.CROPS_COORDS_TOP_LEFT, specs.TARGET_SIZE)

TOKENIZER = replace(specs.TOKENIZER, inputs=(*specs.TOKENIZER.inputs, *_PROMPTS_2),
                    outputs=(*specs.TOKENIZER.outputs[:-1], *ROWS_2, specs.TRUNCATED_TEXT))
PROMPT_EMBEDS = replace(specs.PROMPT_EMBEDS, inputs=(*specs.PROMPT_EMBEDS.inputs, *_PROMPTS_2, ENCODED_ROWS_2,
                                                     POOLED_ROWS),
                        outputs=(specs.TEXT_EMBEDDINGS, POOLED_EMBEDDINGS))
DENOISE = replace(specs.DENOISE, inputs=(*specs.DENOISE.inputs, POOLED_EMBEDDINGS, *_SIZES))

_ROWS = tuple(t.name for t in specs.TEXT_ENCODER.inputs)
_PROMPTS = (specs.PROMPT.name, specs.NEGATIVE_PROMPT.name, specs.GUIDANCE_SCALE.name)
_NAMES_2 = tuple(t.name for t in _PROMPTS_2)
ENCODE_PROMPT = EnsembleSpec(
    "encode_prompt", (*specs.ENCODE_PROMPT.inputs, *_PROMPTS_2),
    (specs.TEXT_EMBEDDINGS, POOLED_EMBEDDINGS, specs.TRUNCATED_TEXT),
    (step(TOKENIZER, *_PROMPTS, specs.CLIP_SKIP.name, *_NAMES_2,
          outputs=(*_ROWS, *(t.name for t in ROWS_2), specs.TRUNCATED_TEXT.name)),
     step(specs.TEXT_ENCODER, *_ROWS, outputs=(specs.ENCODED_ROWS.name,)),
     step(TEXT_ENCODER_2, *((t.name, row.name) for t, row in zip(TEXT_ENCODER_2.inputs, ROWS_2)),
          outputs=((TEXT_ENCODER_2.outputs[0].name, ENCODED_ROWS_2.name), TEXT_EMBEDS.name)),
     step(PROMPT_EMBEDS, *_PROMPTS, specs.ENCODED_ROWS.name, *_NAMES_2, ENCODED_ROWS_2.name, POOLED_ROWS.name,
          outputs=(specs.TEXT_EMBEDDINGS.name, POOLED_EMBEDDINGS.name))),
)
_OPTIONS = (specs.SCHEDULER.name, specs.NUM_IMAGES_PER_PROMPT.name, specs.GUIDANCE_SCALE.name,
            specs.CFG_CUTOFF_STEP_RATIO.name, specs.NUM_INFERENCE_STEPS.name, specs.SEED.name, specs.LORA.name,
            specs.LORA_SCALE.name, *(t.name for t in _SIZES))
_ENCODE_PROMPT_INPUTS = ((specs.PROMPT.name, specs.CHECKED_PROMPT.name), specs.NEGATIVE_PROMPT.name,
                         specs.GUIDANCE_SCALE.name, specs.CLIP_SKIP.name, *_NAMES_2)
_ENCODED = (specs.TEXT_EMBEDDINGS.name, POOLED_EMBEDDINGS.name, specs.TRUNCATED_TEXT.name)
_PLAIN_INPUTS = tuple(t for t in specs.TEXT_TO_IMAGE_INPUTS if t not in specs.CONTROL_INPUTS)
ENSEMBLE_TEXT_TO_IMAGE = EnsembleSpec(
    specs.ENSEMBLE_TEXT_TO_IMAGE.name, _PLAIN_INPUTS, (specs.IMAGES, specs.TRUNCATED_TEXT),
    (step(specs.CHECK_REQUEST, *(t.name for t in _PLAIN_INPUTS), outputs=(specs.CHECKED_PROMPT.name,)),
     step(ENCODE_PROMPT, *_ENCODE_PROMPT_INPUTS, outputs=_ENCODED),
     step(DENOISE, specs.TEXT_EMBEDDINGS.name, POOLED_EMBEDDINGS.name, specs.HEIGHT.name, specs.WIDTH.name,
          *_OPTIONS, outputs=(specs.LATENTS.name,)),
     step(specs.DECODE, specs.LATENTS.name, outputs=(specs.IMAGES.name,))),
)
_IMAGE_INPUTS = specs.IMAGE_TO_IMAGE_INPUTS
ENSEMBLE_IMAGE_TO_IMAGE = EnsembleSpec(
    specs.ENSEMBLE_IMAGE_TO_IMAGE.name, _IMAGE_INPUTS, (specs.IMAGES, specs.TRUNCATED_TEXT),
    (step(specs.CHECK_REQUEST, *(t.name for t in _IMAGE_INPUTS),
          outputs=(specs.CHECKED_PROMPT.name, specs.CHECKED_IMAGE.name)),
     step(ENCODE_PROMPT, *_ENCODE_PROMPT_INPUTS, outputs=_ENCODED),
     step(specs.ENCODE_IMAGE, (specs.INIT_IMAGE.name, specs.CHECKED_IMAGE.name),
          outputs=(specs.LATENT_PARAMETERS.name,)),
     step(DENOISE, specs.TEXT_EMBEDDINGS.name, POOLED_EMBEDDINGS.name, specs.LATENT_PARAMETERS.name,
          specs.STRENGTH.name, *_OPTIONS, outputs=(specs.LATENTS.name,)),
     step(specs.DECODE, specs.LATENTS.name, outputs=(specs.IMAGES.name,))),
)

# What an SDXL repository serves of the ensembles, inner ones first, and their Python steps.
ENSEMBLES = {spec.name: spec for spec in (ENCODE_PROMPT, specs.DECODE, specs.ENCODE_IMAGE, ENSEMBLE_TEXT_TO_IMAGE,
                                          ENSEMBLE_IMAGE_TO_IMAGE)}
ENSEMBLE_STEPS = (specs.CHECK_REQUEST, TOKENIZER, PROMPT_EMBEDS, DENOISE, specs.POSTPROCESS, specs.PREPROCESS_IMAGE)


def ensembles_of(family: str) -> tuple[tuple[specs.PipelineSpec, ...], dict[str, EnsembleSpec]]:
    """The ensembles' Python steps and the ensembles a repository of this family (sd or sdxl) serves."""
    return (ENSEMBLE_STEPS, ENSEMBLES) if family == "sdxl" else (specs.ENSEMBLE_STEPS, specs.ENSEMBLES)


def step_spec(spec: specs.PipelineSpec, family: str) -> specs.PipelineSpec:
    """A Python model's contract in a repository of this family: SDXL's variant of an ensemble step."""
    steps = {step.name: step for step in ensembles_of(family)[0]}
    return steps.get(spec.name, spec) if spec in specs.ENSEMBLE_STEPS else spec
