"""The one source of truth for every tensor the project serves.

Each Triton model owns its input/output names, dtypes, non-batch dims and batch profile here.
The ONNX export (``input_names``/``dynamic_axes``), the trtexec shape flags, every config.pbtxt,
the BLS model and the clients all read these objects; no other file types a tensor name.

Sizes are symbolic ("text_length", "latent_height", ...) and resolved against ``ModelDims``,
which is read from the model's own config files, so SD1.5 gets 77 tokens, 768 features and
64x64 latents while the tiny preset gets its own smaller sizes through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# The checkpoint's sizes and the image sizes served, in a module of their own; named here too, as
# every tensor's dims are resolved against them.
from utils.model_dims import (DYNAMIC, MAX_PROMPT_CHUNKS, Dim, ImageSizes, ModelDims,  # noqa: F401
                              residual_layout)

# What the contracts are made of (tensors, batch profiles, networks), in a module of their own.
from utils.spec_types import (ACTIVATION, BATCH_AXIS, ONNX_FLOAT_PRECISIONS, PRECISIONS, BatchProfile,  # noqa: F401
                              NetworkSpec, TensorSpec)


TEXT_ENCODER = NetworkSpec(
    name="text_encoder",
    # One chunk of a prompt per row: a long prompt is several rows, and prompt weighting asks for
    # more (the same chunk with a down-weighted part masked out: attention_mask 0 there; see
    # pipelines/prompts.py). skipped_layers, per row, the request's clip_skip: 0 gives CLIP's last
    # hidden state; n, the output of the n-th layer before the last through the final layer norm,
    # as diffusers' clip_skip does it.
    inputs=(TensorSpec("input_ids", "INT32", ("text_length",)),
            TensorSpec("attention_mask", "INT32", ("text_length",)),
            TensorSpec("skipped_layers", "INT32", ())),
    outputs=(TensorSpec("last_hidden_state", ACTIVATION, ("text_length", "text_hidden")),),
    # Up to 64 rows: the served text encoder batches several requests together (dynamic
    # batching), and one request's long or weighted prompts take several rows each.
    profile=BatchProfile(1, 2, 64),
    cfg_doubled=True,
)

UNET = NetworkSpec(
    name="unet",
    inputs=(
        # The latents; an inpainting UNet's has the mask and the masked image's latents stacked on.
        TensorSpec("sample", ACTIVATION, ("unet_sample_channels", "latent_height", "latent_width")),
        # One FP32 timestep per sample: requests at different steps can share one batched call,
        # and FP16 would round the fractional timesteps of Euler/LMS-type schedulers.
        TensorSpec("timestep", "FP32", ()),
        # The prompts' embeddings: text_length per chunk of the prompt, positive and negative padded alike.
        TensorSpec("encoder_hidden_states", ACTIVATION, ("prompt_length", "unet_text_hidden")),
    ),
    outputs=(TensorSpec("outputs", ACTIVATION, ("latent_channels", "latent_height", "latent_width")),),
    profile=BatchProfile(1, 2, 16),
    cfg_doubled=True,
)

VAE_ENCODER = NetworkSpec(
    name="vae_encoder",
    inputs=(TensorSpec("image", ACTIVATION, (3, "image_height", "image_width")),),
    outputs=(
        TensorSpec("latent_parameters", ACTIVATION, ("latent_parameters", "latent_height", "latent_width")),
    ),
    profile=BatchProfile(1, 1, 4),
)

VAE_DECODER = NetworkSpec(
    name="vae_decoder",
    inputs=(TensorSpec("sample", ACTIVATION, ("latent_channels", "latent_height", "latent_width")),),
    outputs=(TensorSpec("image", ACTIVATION, (3, "image_height", "image_width")),),
    profile=BatchProfile(1, 1, 4),
)

NETWORKS = {spec.name: spec for spec in (TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER)}

# ControlNet, where a deployment has one or more: each a network of its own, served as
# controlnet_<name> (controlnet_model), called once per step before the UNet with the UNet's own
# inputs and a control image; what it returns, every down block's residual and the mid block's,
# travels packed in one tensor per sample, flattened in the UNet's order (ModelDims.residual_layout),
# so that the contract is the same for every checkpoint, whatever its number of blocks. The UNet
# that adds them is a network of its own too: the plain UNet's graph keeps no input it does not use.
CONTROLNET = NetworkSpec(
    name="controlnet",
    inputs=(
        replace(UNET.inputs[0], dims=("latent_channels", "latent_height", "latent_width")),  # the latents alone
        UNET.inputs[1],
        UNET.inputs[2],
        # The control image (edges, depth, ...), RGB in [0, 1] at the image's size, as diffusers' ControlNet takes it.
        TensorSpec("controlnet_cond", ACTIVATION, (3, "image_height", "image_width")),
    ),
    outputs=(TensorSpec("residuals", ACTIVATION, ("residual_values",)),),
    profile=UNET.profile,
    cfg_doubled=True,
)
CONTROLLED_UNET = NetworkSpec(
    name="controlled_unet",
    inputs=(*UNET.inputs, CONTROLNET.outputs[0]),
    outputs=UNET.outputs,
    profile=UNET.profile,
    cfg_doubled=True,
)
CONTROL_NETWORKS = {spec.name: spec for spec in (CONTROLNET, CONTROLLED_UNET)}


def served_network(served_name: str, family=None) -> NetworkSpec:
    """The spec of a served network, by its served name (``unet_gpu0``, ``unet_<adapter>``,
    ``controlnet_<name>``): its network's, under that name; ``family``: the checkpoint's
    (utils/families.py; default SD1.x), whose UNet and text encoders it names."""
    from utils.families import REFINER_UNET, SD
    from utils.layout import network_of

    networks = {**NETWORKS, **CONTROL_NETWORKS, **(family or SD).networks, REFINER_UNET.name: REFINER_UNET}
    network = networks[network_of(served_name)]
    return network if network.name == served_name else replace(network, name=served_name)


def controlnet_model(name: str) -> NetworkSpec:
    """The served ControlNet of this name (a deployment's --controlnet NAME=...): the ControlNet's
    contract under the model name it is served as."""
    from utils.layout import served_name

    return replace(CONTROLNET, name=served_name(CONTROLNET.name, adapter=name))


# One request's prompts, whichever way it is served: the smallest batch profile of the networks a
# request goes through, counted in prompts (the text encoder and the UNet take each prompt twice).
MAX_PROMPTS = min(network.max_prompts() for network in NETWORKS.values())


def batched(tensor: TensorSpec, name: str | None = None, optional: bool = False) -> TensorSpec:
    """A network's tensor as a model without a batch dimension sees it: the batch as a leading -1
    (and, where a Python model or an ensemble names it for its role, under that name), its other
    dims as they travel (a per-row scalar as [batch, 1])."""
    return TensorSpec(name or tensor.name, tensor.dtype, (-1, *tensor.wire_dims), optional)


@dataclass(frozen=True)
class PipelineSpec:
    """A Python-backend model that is not a network: no batch dimension, one request at a time.
    Either a whole pipeline (BLS: it calls ``networks`` itself), or one step of an ensemble."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    networks: tuple[NetworkSpec, ...] = ()  # the networks it calls by BLS
    # Decoupled (Triton's name for a model that streams): any number of responses per request,
    # the last one flagged final; a client reads them over a gRPC stream.
    decoupled: bool = False

    def max_prompts(self) -> int:
        return MAX_PROMPTS


# The request, as diffusers names its arguments.
PROMPT = TensorSpec("prompt", "BYTES", (-1,))
NEGATIVE_PROMPT = TensorSpec("negative_prompt", "BYTES", (-1,), optional=True)
GUIDANCE_SCALE = TensorSpec("guidance_scale", "FP32", (1,), optional=True)
NUM_INFERENCE_STEPS = TensorSpec("num_inference_steps", "INT32", (1,), optional=True)
SEED = TensorSpec("seed", "INT64", (1,), optional=True)
# Classifier-free guidance stopped after this fraction of the steps (diffusers' SDCFGCutoffCallback).
CFG_CUTOFF_STEP_RATIO = TensorSpec("cfg_cutoff_step_ratio", "FP32", (1,), optional=True)
# LoRA adapters by name (those the deployment serves), each with its weight (diffusers' set_adapters
# adapter_weights; 1 where left out).
LORA = TensorSpec("lora", "BYTES", (-1,), optional=True)
LORA_SCALE = TensorSpec("lora_scale", "FP32", (-1,), optional=True)
# The text encoder's layer to condition on, counted back from the last (diffusers' clip_skip).
CLIP_SKIP = TensorSpec("clip_skip", "INT32", (1,), optional=True)
INIT_IMAGE = TensorSpec("image", "UINT8", (-1, -1, -1, 3))  # [N, H, W, RGB], the image to start from
STRENGTH = TensorSpec("strength", "FP32", (1,), optional=True)
# Inpainting: [N, H, W] grey levels, the image's size, white (128 and above) where to repaint.
MASK_IMAGE = TensorSpec("mask_image", "UINT8", (-1, -1, -1), optional=True)
SCHEDULER = TensorSpec("scheduler", "BYTES", (1,), optional=True)  # a diffusers scheduler's class name
NUM_IMAGES_PER_PROMPT = TensorSpec("num_images_per_prompt", "INT32", (1,), optional=True)
HEIGHT = TensorSpec("height", "INT32", (1,), optional=True)  # text to image: the image's size in pixels
WIDTH = TensorSpec("width", "INT32", (1,), optional=True)
# [N, H, W, RGB], what every pipeline answers, named as diffusers' output names it. (Not "image":
# an ensemble's tensors are one namespace, and image to image takes an "image" in.)
IMAGES = TensorSpec("images", "UINT8", (-1, -1, -1, 3))
# And the text cut from each prompt past the longest served (MAX_PROMPT_CHUNKS chunks), in the
# order they are encoded: the negative prompts first where guidance uses them, then the prompts;
# "" where nothing was cut.
TRUNCATED_TEXT = TensorSpec("truncated_text", "BYTES", (-1,))
# Streaming: a response every PREVIEW_EVERY denoising steps (0: none but the last) with the steps
# done so far, of TOTAL_STEPS, and a preview as IMAGES (the latents' size: H/8 x W/8); the last
# response, FINAL, carries the decoded images.
PREVIEW_EVERY = TensorSpec("preview_every", "INT32", (1,), optional=True)
STEP = TensorSpec("step", "INT32", (1,))
TOTAL_STEPS = TensorSpec("total_steps", "INT32", (1,))
FINAL = TensorSpec("final", "BOOL", (1,))

# ControlNet (text to image), as diffusers names its arguments: the ControlNets by name (those the
# deployment serves), a control image each ([K, H, W, RGB], the image's size), how each was made
# ("none": as sent; "canny": a photo, made into its edges on the server), and one weight, start
# and end (fractions of the steps) each, or one for all.
CONTROLNET_NAMES = TensorSpec("controlnet", "BYTES", (-1,), optional=True)
CONTROL_IMAGE = TensorSpec("control_image", "UINT8", (-1, -1, -1, 3), optional=True)
CONTROL_MODE = TensorSpec("control_mode", "BYTES", (-1,), optional=True)
CONTROLNET_CONDITIONING_SCALE = TensorSpec("controlnet_conditioning_scale", "FP32", (-1,), optional=True)
CONTROL_GUIDANCE_START = TensorSpec("control_guidance_start", "FP32", (-1,), optional=True)
CONTROL_GUIDANCE_END = TensorSpec("control_guidance_end", "FP32", (-1,), optional=True)
CONTROL_INPUTS = (CONTROLNET_NAMES, CONTROL_IMAGE, CONTROL_MODE, CONTROLNET_CONDITIONING_SCALE, CONTROL_GUIDANCE_START,
                  CONTROL_GUIDANCE_END)

# SDXL's (utils/families.py; an SD1.x deployment refuses them by name), as diffusers names them: the second
# text encoder's prompts, the time ids' sizes [height, width] in pixels, the refiner's aesthetic scores, and
# the fraction of the steps the base denoises before the refiner (the expert ensemble).
PROMPT_2 = replace(NEGATIVE_PROMPT, name="prompt_2")
NEGATIVE_PROMPT_2 = replace(NEGATIVE_PROMPT, name="negative_prompt_2")
ORIGINAL_SIZE, CROPS_COORDS_TOP_LEFT, TARGET_SIZE = (TensorSpec(name, "INT32", (2,), optional=True)
                                                     for name in ("original_size", "crops_coords_top_left", "target_size"))
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, HIGH_NOISE_FRAC = (
    replace(STRENGTH, name=name) for name in ("aesthetic_score", "negative_aesthetic_score", "high_noise_frac"))
SDXL_INPUTS = (PROMPT_2, NEGATIVE_PROMPT_2, ORIGINAL_SIZE, CROPS_COORDS_TOP_LEFT, TARGET_SIZE, AESTHETIC_SCORE,
               NEGATIVE_AESTHETIC_SCORE, HIGH_NOISE_FRAC)

# Every input a request can have, in one order (GenerationRequest's fields). Image to image takes
# its size from the image; text to image takes no image.
REQUEST_INPUTS = (PROMPT, NEGATIVE_PROMPT, INIT_IMAGE, MASK_IMAGE, STRENGTH, SCHEDULER, NUM_IMAGES_PER_PROMPT, HEIGHT,
                  WIDTH, GUIDANCE_SCALE, CFG_CUTOFF_STEP_RATIO, NUM_INFERENCE_STEPS, SEED, LORA, LORA_SCALE, CLIP_SKIP,
                  *CONTROL_INPUTS, *SDXL_INPUTS)
TEXT_TO_IMAGE_INPUTS = tuple(t for t in REQUEST_INPUTS if t not in (INIT_IMAGE, MASK_IMAGE, STRENGTH))
# image to image with a mask; ControlNet guides text to image only
INPAINT_INPUTS = tuple(t for t in REQUEST_INPUTS if t not in (HEIGHT, WIDTH, *CONTROL_INPUTS))
IMAGE_TO_IMAGE_INPUTS = tuple(t for t in INPAINT_INPUTS if t is not MASK_IMAGE)

# What flows between the steps of the ensembles, each one a network's tensor with its batch.
ENCODED_ROWS = batched(TEXT_ENCODER.outputs[0])  # the text encoder's rows, a chunk each
TEXT_EMBEDDINGS = TensorSpec("text_embeddings", ACTIVATION, (-1, *UNET.inputs[2].dims))  # the UNet's, a row per text
LATENT_PARAMETERS = batched(VAE_ENCODER.outputs[0])  # the VAE encoder's mean and log-variance
# Inpainting: the same of the masked image (the pixels to repaint made grey), for an inpainting UNet.
MASKED_LATENT_PARAMETERS = batched(VAE_ENCODER.outputs[0], "masked_latent_parameters", optional=True)
LATENTS = batched(VAE_DECODER.inputs[0], "latents")  # unscaled, ready for the VAE decoder
DECODED = batched(VAE_DECODER.outputs[0], "decoded")  # the VAE decoder's image in [-1, 1]
NORMALIZED = batched(VAE_ENCODER.inputs[0], "normalized")  # an image in [-1, 1], for the VAE encoder

# The BLS pipelines: the whole loop in one model. Image to image with a mask_image inpaints: the
# same model, as the loop is the same one with the mask applied at each step.
TEXT_TO_IMAGE = PipelineSpec("pipeline_text_to_image", TEXT_TO_IMAGE_INPUTS, (IMAGES, TRUNCATED_TEXT),
                             networks=(TEXT_ENCODER, UNET, VAE_DECODER))
IMAGE_TO_IMAGE = PipelineSpec("pipeline_image_to_image", INPAINT_INPUTS, (IMAGES, TRUNCATED_TEXT),
                              networks=(TEXT_ENCODER, VAE_ENCODER, UNET, VAE_DECODER))
# With live progress: the same loops, streaming previews, then the images (with the text cut).
TEXT_TO_IMAGE_STREAM, IMAGE_TO_IMAGE_STREAM = (
    replace(spec, name=f"{spec.name}_stream", inputs=(*spec.inputs, PREVIEW_EVERY),
            outputs=(STEP, TOTAL_STEPS, IMAGES, FINAL, TRUNCATED_TEXT), decoupled=True)
    for spec in (TEXT_TO_IMAGE, IMAGE_TO_IMAGE))

# The Python steps of the ensembles: each a thin adapter over the shared loop's code.
# The ensembles' first steps take every input as optional, and refuse a missing one themselves:
# an ensemble whose required input is missing answers only "unexpected deadlock".
# The first of all checks the whole request as the BLS pipelines do, before any network runs: the
# prompt (and the image) go on to the other steps from it, so none starts until it has answered.
CHECKED_PROMPT = replace(PROMPT, name="checked_prompt")
CHECKED_IMAGE = replace(INIT_IMAGE, name="checked_image")  # image to image's ensemble asks for it
CHECKED_MASK = replace(MASK_IMAGE, name="checked_mask_image", optional=False)  # and the inpainting one this
CHECKED_CONTROL_IMAGE = replace(CONTROL_IMAGE, name="checked_control_image", optional=False)  # and ControlNet's this
CHECK_REQUEST = PipelineSpec("check_request", tuple(replace(t, optional=True) for t in REQUEST_INPUTS),
                             (CHECKED_PROMPT, CHECKED_IMAGE, CHECKED_MASK, CHECKED_CONTROL_IMAGE))
# The prompts' two steps around the text encoder (pipelines/prompts.py): the rows it encodes (a
# chunk each, and compel's masked variants of weighted ones), then the UNet's embeddings from them.
_PROMPT_INPUTS = (replace(PROMPT, optional=True), NEGATIVE_PROMPT, GUIDANCE_SCALE)
TOKENIZER = PipelineSpec("tokenizer", (*_PROMPT_INPUTS, CLIP_SKIP),
                         (*(batched(t) for t in TEXT_ENCODER.inputs), TRUNCATED_TEXT))
PROMPT_EMBEDS = PipelineSpec("prompt_embeds", (*_PROMPT_INPUTS, ENCODED_ROWS), (TEXT_EMBEDDINGS,))
DENOISE = PipelineSpec(  # the loop repeats with a scheduler: no static graph can express it, so BLS
    "denoise", (TEXT_EMBEDDINGS, batched(VAE_ENCODER.outputs[0], optional=True), MASKED_LATENT_PARAMETERS,
                MASK_IMAGE, STRENGTH, SCHEDULER, NUM_IMAGES_PER_PROMPT, HEIGHT, WIDTH, GUIDANCE_SCALE,
                CFG_CUTOFF_STEP_RATIO, NUM_INFERENCE_STEPS, SEED, LORA, LORA_SCALE, *CONTROL_INPUTS),
    (LATENTS,), networks=(UNET,))
POSTPROCESS = PipelineSpec("postprocess", (DECODED,), (IMAGES,))
# ControlNet's branch: the control images as the ControlNets take them, made from the photos where
# control_mode asks (canny: their edges), each as sent otherwise.
PREPARED_CONTROL_IMAGE = replace(CONTROL_IMAGE, name="prepared_control_image", optional=False)
PREPROCESS_CONTROL = PipelineSpec("preprocess_control", (replace(CONTROL_IMAGE, optional=True), CONTROL_MODE),
                                  (PREPARED_CONTROL_IMAGE,))
# With a mask_image, the masked image: the pixels to repaint made grey (0 in [-1, 1]), as diffusers'.
PREPROCESS_IMAGE = PipelineSpec("preprocess_image", (replace(INIT_IMAGE, optional=True), MASK_IMAGE), (NORMALIZED,))

BLS_PIPELINES = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE, TEXT_TO_IMAGE_STREAM, IMAGE_TO_IMAGE_STREAM)
ENSEMBLE_STEPS = (CHECK_REQUEST, TOKENIZER, PROMPT_EMBEDS, DENOISE, POSTPROCESS, PREPROCESS_IMAGE, PREPROCESS_CONTROL)
PIPELINES = {spec.name: spec for spec in (*BLS_PIPELINES, *ENSEMBLE_STEPS)}


@dataclass(frozen=True)
class EnsembleStep:
    """One model of an ensemble: which ensemble tensor feeds each of its inputs, and which ensemble
    tensor each of its outputs becomes (model tensor name -> ensemble tensor name)."""

    model: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]


def step(model: PipelineSpec | NetworkSpec | EnsembleSpec, *inputs: str | tuple[str, str],
         outputs: tuple[str | tuple[str, str], ...]) -> EnsembleStep:
    """A step whose tensors keep the model's names, except those given as (model name, ensemble name)."""
    pairs = lambda names: tuple((n, n) if isinstance(n, str) else n for n in names)  # noqa: E731
    return EnsembleStep(model.name, pairs(inputs), pairs(outputs))


@dataclass(frozen=True)
class EnsembleSpec:
    """A Triton ensemble: a static data-flow graph of models (ensembles among them)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[EnsembleStep, ...]
    decoupled: bool = False  # an ensemble answers once: no ensemble here streams

    def max_prompts(self) -> int:
        return MAX_PROMPTS


_ROWS = tuple(t.name for t in TEXT_ENCODER.inputs)
_PROMPTS = (PROMPT.name, NEGATIVE_PROMPT.name, GUIDANCE_SCALE.name)
ENCODE_PROMPT = EnsembleSpec(
    "encode_prompt", (PROMPT, NEGATIVE_PROMPT, GUIDANCE_SCALE, CLIP_SKIP), (TEXT_EMBEDDINGS, TRUNCATED_TEXT),
    (step(TOKENIZER, *_PROMPTS, CLIP_SKIP.name, outputs=(*_ROWS, TRUNCATED_TEXT.name)),
     step(TEXT_ENCODER, *_ROWS, outputs=(ENCODED_ROWS.name,)),
     step(PROMPT_EMBEDS, *_PROMPTS, ENCODED_ROWS.name, outputs=(TEXT_EMBEDDINGS.name,))),
)
DECODE = EnsembleSpec(
    "decode", (LATENTS,), (IMAGES,),
    (step(VAE_DECODER, (VAE_DECODER.inputs[0].name, LATENTS.name), outputs=((VAE_DECODER.outputs[0].name, DECODED.name),)),
     step(POSTPROCESS, DECODED.name, outputs=(IMAGES.name,))),
)
ENCODE_IMAGE = EnsembleSpec(
    "encode_image", (INIT_IMAGE,), (LATENT_PARAMETERS,),
    (step(PREPROCESS_IMAGE, INIT_IMAGE.name, outputs=(NORMALIZED.name,)),
     step(VAE_ENCODER, (VAE_ENCODER.inputs[0].name, NORMALIZED.name), outputs=(LATENT_PARAMETERS.name,))),
)
ENCODE_MASKED_IMAGE = EnsembleSpec(  # the same steps, given the mask too
    "encode_masked_image", (INIT_IMAGE, MASK_IMAGE), (MASKED_LATENT_PARAMETERS,),
    (step(PREPROCESS_IMAGE, INIT_IMAGE.name, MASK_IMAGE.name, outputs=(NORMALIZED.name,)),
     step(VAE_ENCODER, (VAE_ENCODER.inputs[0].name, NORMALIZED.name),
          outputs=((LATENT_PARAMETERS.name, MASKED_LATENT_PARAMETERS.name),))),
)
_OPTIONS = (SCHEDULER.name, NUM_IMAGES_PER_PROMPT.name, GUIDANCE_SCALE.name, CFG_CUTOFF_STEP_RATIO.name,
            NUM_INFERENCE_STEPS.name, SEED.name, LORA.name, LORA_SCALE.name)
_CHECKED_PROMPT = (PROMPT.name, CHECKED_PROMPT.name)  # encode_prompt's prompt: the checked one
_ENCODE_PROMPT_INPUTS = (_CHECKED_PROMPT, NEGATIVE_PROMPT.name, GUIDANCE_SCALE.name, CLIP_SKIP.name)
_PLAIN_INPUTS = tuple(t for t in TEXT_TO_IMAGE_INPUTS if t not in CONTROL_INPUTS)  # ControlNet has its own graph
ENSEMBLE_TEXT_TO_IMAGE = EnsembleSpec(
    "ensemble_text_to_image", _PLAIN_INPUTS, (IMAGES, TRUNCATED_TEXT),
    (step(CHECK_REQUEST, *(t.name for t in _PLAIN_INPUTS), outputs=(CHECKED_PROMPT.name,)),
     step(ENCODE_PROMPT, *_ENCODE_PROMPT_INPUTS, outputs=(TEXT_EMBEDDINGS.name, TRUNCATED_TEXT.name)),
     step(DENOISE, TEXT_EMBEDDINGS.name, HEIGHT.name, WIDTH.name, *_OPTIONS, outputs=(LATENTS.name,)),
     step(DECODE, LATENTS.name, outputs=(IMAGES.name,))),
)
# ControlNet: text to image's graph with a branch beside the prompt's, the control images made
# ready (preprocess_control) for the denoise step, which calls the ControlNets with the UNet. Its own
# graph: an ensemble cannot skip a step, and a plain request has no control image to prepare.
ENSEMBLE_CONTROLNET = EnsembleSpec(
    "ensemble_controlnet", TEXT_TO_IMAGE_INPUTS, (IMAGES, TRUNCATED_TEXT),
    (step(CHECK_REQUEST, *(t.name for t in TEXT_TO_IMAGE_INPUTS), outputs=(CHECKED_PROMPT.name,
                                                                         CHECKED_CONTROL_IMAGE.name)),
     step(ENCODE_PROMPT, *_ENCODE_PROMPT_INPUTS, outputs=(TEXT_EMBEDDINGS.name, TRUNCATED_TEXT.name)),
     step(PREPROCESS_CONTROL, (CONTROL_IMAGE.name, CHECKED_CONTROL_IMAGE.name), CONTROL_MODE.name,
          outputs=(PREPARED_CONTROL_IMAGE.name,)),
     step(DENOISE, TEXT_EMBEDDINGS.name, HEIGHT.name, WIDTH.name, *_OPTIONS, CONTROLNET_NAMES.name,
          (CONTROL_IMAGE.name, PREPARED_CONTROL_IMAGE.name), CONTROLNET_CONDITIONING_SCALE.name,
          CONTROL_GUIDANCE_START.name, CONTROL_GUIDANCE_END.name, outputs=(LATENTS.name,)),
     step(DECODE, LATENTS.name, outputs=(IMAGES.name,))),
)
ENSEMBLE_IMAGE_TO_IMAGE = EnsembleSpec(
    "ensemble_image_to_image", IMAGE_TO_IMAGE_INPUTS, (IMAGES, TRUNCATED_TEXT),
    (step(CHECK_REQUEST, *(t.name for t in IMAGE_TO_IMAGE_INPUTS), outputs=(CHECKED_PROMPT.name, CHECKED_IMAGE.name)),
     step(ENCODE_PROMPT, *_ENCODE_PROMPT_INPUTS, outputs=(TEXT_EMBEDDINGS.name, TRUNCATED_TEXT.name)),
     step(ENCODE_IMAGE, (INIT_IMAGE.name, CHECKED_IMAGE.name), outputs=(LATENT_PARAMETERS.name,)),
     step(DENOISE, TEXT_EMBEDDINGS.name, LATENT_PARAMETERS.name, STRENGTH.name, *_OPTIONS, outputs=(LATENTS.name,)),
     step(DECODE, LATENTS.name, outputs=(IMAGES.name,))),
)

# Inpainting: image to image's graph, with the masked image encoded beside the image (an ensemble
# cannot skip a step: with a plain UNet, whose loop blends the image back outside the mask instead,
# the denoise step only draws from its latent distribution, as diffusers does).
_CHECKED_MASK = (MASK_IMAGE.name, CHECKED_MASK.name)
ENSEMBLE_INPAINT = EnsembleSpec(
    "ensemble_inpaint", INPAINT_INPUTS, (IMAGES, TRUNCATED_TEXT),
    (step(CHECK_REQUEST, *(t.name for t in INPAINT_INPUTS),
          outputs=(CHECKED_PROMPT.name, CHECKED_IMAGE.name, CHECKED_MASK.name)),
     step(ENCODE_PROMPT, *_ENCODE_PROMPT_INPUTS, outputs=(TEXT_EMBEDDINGS.name, TRUNCATED_TEXT.name)),
     step(ENCODE_IMAGE, (INIT_IMAGE.name, CHECKED_IMAGE.name), outputs=(LATENT_PARAMETERS.name,)),
     step(ENCODE_MASKED_IMAGE, (INIT_IMAGE.name, CHECKED_IMAGE.name), _CHECKED_MASK,
          outputs=(MASKED_LATENT_PARAMETERS.name,)),
     step(DENOISE, TEXT_EMBEDDINGS.name, LATENT_PARAMETERS.name, MASKED_LATENT_PARAMETERS.name, _CHECKED_MASK,
          STRENGTH.name, *_OPTIONS, outputs=(LATENTS.name,)),
     step(DECODE, LATENTS.name, outputs=(IMAGES.name,))),
)

# Inner ensembles first: Triton loads them in any order, but a reader meets them in this one.
ENSEMBLES = {spec.name: spec for spec in (ENCODE_PROMPT, DECODE, ENCODE_IMAGE, ENCODE_MASKED_IMAGE,
                                          ENSEMBLE_TEXT_TO_IMAGE, ENSEMBLE_IMAGE_TO_IMAGE, ENSEMBLE_INPAINT,
                                          ENSEMBLE_CONTROLNET)}
