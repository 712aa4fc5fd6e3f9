"""SDXL's ensembles: SD1.x's graphs (utils/specs.py) with what SDXL adds flowing through them.

The models keep their names (a repository serves one family: utils/families.py), and their
contracts gain SDXL's tensors:

- ``tokenizer`` plans the rows of both text encoders (the second's as ``input_ids_2``, ...);
- ``encode_prompt`` = tokenizer -> text_encoder and text_encoder_2 (side by side) -> prompt_embeds,
  which also answers the pooled text (``pooled_embeddings``);
- ``denoise`` takes the pooled text and the size conditions, and makes the time ids;
- text to image and image to image: check_request -> encode_prompt (, encode_image) -> denoise -> decode;
- base then refiner (diffusers' ensemble of expert denoisers), where the refiner is served, as an
  ensemble of ensembles: check_request -> text_to_latents (encode_prompt -> denoise, which stops
  where high_noise_frac of the noise is left) -> refine_latents (refiner_encode_prompt ->
  refiner_denoise, from there on) -> decode. The refiner's three Python steps run its own
  checkpoint's tokenizer and scheduler (its loop: pipelines/sdxl.py); they and these ensembles are
  committed under triton/refiner_models, as a server loads triton/models whole.

Inpainting and ControlNet are SD1.x's, and so are their ensembles.
"""

from __future__ import annotations

from dataclasses import replace

from utils import specs
from utils.families import REFINER_UNET, TEXT_ENCODER_2, TEXT_EMBEDS
from utils.spec_types import ACTIVATION, TensorSpec
from utils.specs import EnsembleSpec, PipelineSpec, batched, step

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
DENOISE = replace(specs.DENOISE, inputs=(*specs.DENOISE.inputs, POOLED_EMBEDDINGS, *_SIZES, specs.HIGH_NOISE_FRAC))
# The first step answers the checked fraction to the ensemble of base then refiner, which asks for it.
CHECKED_HIGH_NOISE_FRAC = replace(specs.HIGH_NOISE_FRAC, name="checked_high_noise_frac", optional=False)
CHECK_REQUEST = replace(specs.CHECK_REQUEST, outputs=(*specs.CHECK_REQUEST.outputs, CHECKED_HIGH_NOISE_FRAC))

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


# Base then refiner. The refiner's steps: its text encoder's rows (the second text encoder's, which
# it shares with the base, for the prompts: not prompt_2, as diffusers' refiner), its conditioning,
# and its loop, which continues the base's latents (base_latents) with the refiner's UNet.
_INPUTS = {t.name: t for t in specs.REQUEST_INPUTS}


def _request_inputs(*names: str) -> tuple[TensorSpec, ...]:
    return tuple(_INPUTS[name] for name in dict.fromkeys(names))  # each once, in order


BASE_LATENTS = replace(specs.LATENTS, name="base_latents")
REFINER_TOKENIZER = PipelineSpec("refiner_tokenizer", specs.TOKENIZER.inputs, (*ROWS_2, specs.TRUNCATED_TEXT))
REFINER_PROMPT_EMBEDS = PipelineSpec("refiner_prompt_embeds", (*specs.PROMPT_EMBEDS.inputs[:-1], ENCODED_ROWS_2,
                                                               POOLED_ROWS), (specs.TEXT_EMBEDDINGS, POOLED_EMBEDDINGS))
_REFINER_OPTIONS = (specs.SCHEDULER.name, specs.NUM_IMAGES_PER_PROMPT.name, specs.GUIDANCE_SCALE.name,
                    specs.CFG_CUTOFF_STEP_RATIO.name, specs.NUM_INFERENCE_STEPS.name, specs.SEED.name,
                    specs.ORIGINAL_SIZE.name, specs.CROPS_COORDS_TOP_LEFT.name, specs.AESTHETIC_SCORE.name,
                    specs.NEGATIVE_AESTHETIC_SCORE.name, specs.HIGH_NOISE_FRAC.name)
REFINER_DENOISE = PipelineSpec(
    "refiner_denoise", (specs.TEXT_EMBEDDINGS, POOLED_EMBEDDINGS, BASE_LATENTS, *_request_inputs(*_REFINER_OPTIONS)),
    (specs.LATENTS,), networks=(REFINER_UNET,))
REFINER_ENCODE_PROMPT = EnsembleSpec(
    "refiner_encode_prompt", specs.ENCODE_PROMPT.inputs, (specs.TEXT_EMBEDDINGS, POOLED_EMBEDDINGS),
    (step(REFINER_TOKENIZER, *_PROMPTS, specs.CLIP_SKIP.name, outputs=tuple(t.name for t in ROWS_2)),
     step(TEXT_ENCODER_2, *((t.name, row.name) for t, row in zip(TEXT_ENCODER_2.inputs, ROWS_2)),
          outputs=((TEXT_ENCODER_2.outputs[0].name, ENCODED_ROWS_2.name), TEXT_EMBEDS.name)),
     step(REFINER_PROMPT_EMBEDS, *_PROMPTS, ENCODED_ROWS_2.name, POOLED_ROWS.name,
          outputs=(specs.TEXT_EMBEDDINGS.name, POOLED_EMBEDDINGS.name))),
)
_PROMPT_NAMES = tuple(t.name for t in specs.ENCODE_PROMPT.inputs)
_BASE_OPTIONS = (specs.HEIGHT.name, specs.WIDTH.name, *_OPTIONS, specs.HIGH_NOISE_FRAC.name)
TEXT_TO_LATENTS = EnsembleSpec(  # the base's part: text to image's graph up to the latents
    "text_to_latents", _request_inputs(*_PROMPT_NAMES, *_NAMES_2, *_BASE_OPTIONS),
    (specs.LATENTS, specs.TRUNCATED_TEXT),
    (step(ENCODE_PROMPT, *_PROMPT_NAMES, *_NAMES_2, outputs=_ENCODED),
     step(DENOISE, specs.TEXT_EMBEDDINGS.name, POOLED_EMBEDDINGS.name, *_BASE_OPTIONS, outputs=(specs.LATENTS.name,))),
)
REFINE_LATENTS = EnsembleSpec(  # the refiner's part: latents in, latents out
    "refine_latents", (BASE_LATENTS, *_request_inputs(*_PROMPT_NAMES, *_REFINER_OPTIONS)),
    (specs.LATENTS,),
    (step(REFINER_ENCODE_PROMPT, *_PROMPT_NAMES, outputs=(specs.TEXT_EMBEDDINGS.name, POOLED_EMBEDDINGS.name)),
     step(REFINER_DENOISE, specs.TEXT_EMBEDDINGS.name, POOLED_EMBEDDINGS.name, BASE_LATENTS.name, *_REFINER_OPTIONS,
          outputs=(specs.LATENTS.name,))),
)
_CHECKED = ((specs.PROMPT.name, specs.CHECKED_PROMPT.name),
            (specs.HIGH_NOISE_FRAC.name, CHECKED_HIGH_NOISE_FRAC.name))  # the checked ones go on
ENSEMBLE_TEXT_TO_IMAGE_REFINED = EnsembleSpec(
    "ensemble_text_to_image_refined", _PLAIN_INPUTS, (specs.IMAGES, specs.TRUNCATED_TEXT),
    (step(CHECK_REQUEST, *(t.name for t in _PLAIN_INPUTS),
          outputs=(specs.CHECKED_PROMPT.name, CHECKED_HIGH_NOISE_FRAC.name)),
     step(TEXT_TO_LATENTS, _CHECKED[0], *_PROMPT_NAMES[1:], *_NAMES_2, *_BASE_OPTIONS[:-1], _CHECKED[1],
          outputs=((specs.LATENTS.name, BASE_LATENTS.name), specs.TRUNCATED_TEXT.name)),
     step(REFINE_LATENTS, _CHECKED[0], *_PROMPT_NAMES[1:], BASE_LATENTS.name, *_REFINER_OPTIONS[:-1], _CHECKED[1],
          outputs=(specs.LATENTS.name,)),
     step(specs.DECODE, specs.LATENTS.name, outputs=(specs.IMAGES.name,))),
)

# What an SDXL repository serves of the ensembles, inner ones first, and their Python steps; with
# its refiner, base then refiner's too (committed in triton/refiner_models).
ENSEMBLES = {spec.name: spec for spec in (ENCODE_PROMPT, specs.DECODE, specs.ENCODE_IMAGE, ENSEMBLE_TEXT_TO_IMAGE,
                                          ENSEMBLE_IMAGE_TO_IMAGE)}
ENSEMBLE_STEPS = (CHECK_REQUEST, TOKENIZER, PROMPT_EMBEDS, DENOISE, specs.POSTPROCESS, specs.PREPROCESS_IMAGE)
REFINER_STEPS = (REFINER_TOKENIZER, REFINER_PROMPT_EMBEDS, REFINER_DENOISE)
REFINER_ENSEMBLES = {spec.name: spec for spec in (REFINER_ENCODE_PROMPT, TEXT_TO_LATENTS, REFINE_LATENTS,
                                                  ENSEMBLE_TEXT_TO_IMAGE_REFINED)}


def ensembles_of(family: str, refiner: bool = False) -> tuple[tuple[specs.PipelineSpec, ...], dict[str, EnsembleSpec]]:
    """The ensembles' Python steps and the ensembles a repository of this family (sd or sdxl) serves
    (``refiner``: with SDXL's refiner)."""
    if family != "sdxl":
        return specs.ENSEMBLE_STEPS, specs.ENSEMBLES
    return (ENSEMBLE_STEPS + REFINER_STEPS, ENSEMBLES | REFINER_ENSEMBLES) if refiner else (ENSEMBLE_STEPS, ENSEMBLES)


def step_spec(spec: specs.PipelineSpec, family: str) -> specs.PipelineSpec:
    """A Python model's contract in a repository of this family: SDXL's variant of an ensemble step."""
    steps = {step.name: step for step in ensembles_of(family)[0]}
    return steps.get(spec.name, spec) if spec in specs.ENSEMBLE_STEPS else spec
