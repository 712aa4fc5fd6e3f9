"""Where a Stable Diffusion checkpoint comes from: a built-in preset, a local folder or the hub.

Every source ends up as an ordinary diffusers folder (model_index.json, text_encoder/, unet/,
vae/, tokenizer/, scheduler/), so everything downstream loads a preset exactly like the real
SD1.5. The presets need no download:

- ``tiny``: a few-MB random pipeline, deterministic from a seed, that runs in seconds on a CPU
  (the default for the quickstart, the tests and CI);
- ``sd15-random``: the exact SD1.5 architecture with random weights, for GPU benchmarks that
  need the real compute cost but cannot reach the hub;
- ``tiny-inpaint`` and ``sd15-random-inpaint``: the same with an inpainting UNet (9 input
  channels: the latents, the mask and the masked image's latents), as SD1.5's inpainting
  checkpoint has, written as a ``StableDiffusionInpaintPipeline``;
- SDXL's: ``tiny-sdxl``, ``tiny-sdxl-refiner``, ``sdxl-random``, ``sdxl-refiner-random``
  (utils/sdxl_presets.py).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from utils.errors import UsageError, UserError
from utils.sdxl_presets import SDXL_PRESETS, SDXL_SCHEDULER_EXTRAS, build_sdxl_preset

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"  # and its refiner: stabilityai/stable-diffusion-xl-refiner-1.0
DEFAULT_MODELS_DIR = Path("models")

# The scheduler SD1.5 ships (scheduler/scheduler_config.json of the hub checkpoint).
SD15_SCHEDULER_CLASS = "PNDMScheduler"  # its scheduler_config.json's _class_name
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)
SD15_SCHEDULER_EXTRAS = dict(clip_sample=False)  # in its scheduler_config.json too, for the other schedulers

# Architectures. SD1.5's values are those of its config.json files; "tiny" keeps the same
# structure (4 VAE levels, so h = H/8; cross-attention in the UNet; 77 tokens, so that a prompt is
# long, and chunked, past the same 75 tokens as SD1.5's) at toy widths.
PRESETS = {
    "tiny": dict(
        text_encoder=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, vocab_size=1000, projection_dim=32,
        ),
        unet=dict(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16,
        ),
        vae=dict(
            sample_size=64, block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=16,
        ),
    ),
    "sd15-random": dict(
        text_encoder=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu",
        ),
        unet=dict(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32,
        ),
        vae=dict(
            sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32,
        ),
    ),
}
# Inpainting checkpoints: the UNet takes the mask and the masked image's latents with the latents.
INPAINTING_UNET = dict(in_channels=9, out_channels=4)
for _name in ("tiny", "sd15-random"):
    PRESETS[f"{_name}-inpaint"] = {**PRESETS[_name], "unet": {**PRESETS[_name]["unet"], **INPAINTING_UNET}}


PRESET_NAMES = (*PRESETS, *SDXL_PRESETS)


def preset_dims(name: str):
    """The sizes of a preset's checkpoint, from its architecture (as ModelDims.from_pretrained
    reads them from a written checkpoint), without building it."""
    from utils.specs import ModelDims, residual_layout

    text, unet, vae = (PRESETS[name][part] for part in ("text_encoder", "unet", "vae"))
    in_channels = unet.get("in_channels", vae["latent_channels"])
    return ModelDims(text_length=text["max_position_embeddings"], text_hidden=text["hidden_size"],
                     latent_channels=vae["latent_channels"], latent_height=unet["sample_size"],
                     latent_width=unet["sample_size"], vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
                     unet_in_channels=0 if in_channels == vae["latent_channels"] else in_channels,
                     residual_layout=residual_layout(unet), text_layers=text["num_hidden_layers"])


def model_slug(model: str) -> str:
    """A folder name for a model source: 'tiny', 'my-model', 'stable-diffusion-v1-5--stable-...'."""
    path = Path(model)
    name = path.name if path.is_dir() else model.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def resolve_model(model: str, models_dir: str | Path = DEFAULT_MODELS_DIR, seed: int = 0,
                  weights: bool = True) -> Path:
    """Return a local diffusers folder for ``model``: a preset name, a folder or a hub id.

    ``weights=False``: from the hub, only the config, tokenizer and scheduler files, for the steps
    that read nothing else (the model repository of exported graphs, the client-side pipeline).
    """
    if model in PRESET_NAMES:
        target = Path(models_dir) / model
        if not (target / "model_index.json").exists():
            build_preset(model, target, seed=seed, models_dir=Path(models_dir))
        return target
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise UsageError(
                f"--model {model!r} is a folder but not a diffusers pipeline (no model_index.json). "
                f"Pass a folder written by DiffusionPipeline.save_pretrained, a hub id such as "
                f"{SD15_HUB_ID!r}, or a preset: {', '.join(PRESET_NAMES)}."
            )
        return path
    if "/" not in model:
        raise UsageError(
            f"--model {model!r} is neither a preset ({', '.join(PRESET_NAMES)}), nor an existing folder, "
            f"nor a hub id of the form 'owner/name' (for SD1.5: {SD15_HUB_ID!r})."
        )
    return download_from_hub(model, weights)


NETWORK_FOLDERS = ("text_encoder", "text_encoder_2", "unet", "vae")  # of a diffusers checkpoint (SDXL's second)


def hub_patterns(weights: bool = True) -> list[str]:
    """The files of a hub checkpoint the project reads: configs, tokenizer, scheduler, and with
    ``weights`` the networks' safetensors (about 4 GB for SD1.5)."""
    names = ("config.json", "*.safetensors") if weights else ("config.json",)
    return ["model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*"] + [
        f"{folder}/{name}" for folder in NETWORK_FOLDERS for name in names]


def download_from_hub(model_id: str, weights: bool = True) -> Path:
    """Download only what the project uses (``hub_patterns``)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=hub_patterns(weights),
                                      ignore_patterns=["*.fp16.*", "*non_ema*"]))
    except Exception as error:  # network, auth or unknown repo: one message with the ways out
        raise UserError(
            f"--model {model_id!r}: could not download it from the Hugging Face hub ({error}). "
            f"Check the id and your network, log in with `huggingface-cli login` (HF_TOKEN) if the "
            f"repository is gated, or pass a local diffusers folder or an offline preset "
            f"({', '.join(PRESET_NAMES)})."
        ) from error


def build_preset(name: str, target: str | Path, seed: int = 0, models_dir: Path = DEFAULT_MODELS_DIR) -> Path:
    """Write a random-weight pipeline of the preset's architecture as a diffusers folder.

    Deterministic: the same seed writes the same weights. The folder appears atomically, so a
    half-written preset is never mistaken for a finished one. (An SDXL refiner's base is written
    first, under ``models_dir``, where missing.)
    """
    if name in SDXL_PRESETS:
        return _save_preset(build_sdxl_preset(name, models_dir, seed), Path(target), name, seed)
    import torch
    import transformers
    from transformers import CLIPTextConfig, CLIPTextModel

    # The pipeline class imports image processors it does not use here (no safety checker), and
    # transformers warns on each that torchvision is missing: noise on every first export.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        import diffusers
        from diffusers import (AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                               UNet2DConditionModel)
    finally:
        transformers.logging.set_verbosity(verbosity)

    architecture = PRESETS[name]
    text_config = architecture["text_encoder"]
    torch.manual_seed(seed)
    tokenizer = make_byte_level_clip_tokenizer(model_max_length=text_config["max_position_embeddings"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **text_config,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(**architecture["unet"])
    vae = AutoencoderKL(**architecture["vae"])
    pipeline_class = StableDiffusionInpaintPipeline if unet.config.in_channels == 9 else StableDiffusionPipeline
    pipeline = pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=getattr(diffusers, SD15_SCHEDULER_CLASS)(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if not name.startswith("tiny"):  # the large presets are for GPUs: half the disk, and loaded as FP16 anyway
        pipeline.to(torch.float16)
    return _save_preset(pipeline, Path(target), name, seed)


def _save_preset(pipeline, target: Path, name: str, seed: int) -> Path:
    """The preset written whole, or not at all (write_folder)."""
    def write(staging: Path) -> None:
        pipeline.save_pretrained(staging)
        _write_scheduler_extras(staging / "scheduler" / "scheduler_config.json",
                                SDXL_SCHEDULER_EXTRAS if name in SDXL_PRESETS else SD15_SCHEDULER_EXTRAS)
        (staging / "preset.json").write_text(json.dumps({"preset": name, "seed": seed}, indent=2) + "\n")

    return write_folder(target, write, "model_index.json")


def write_folder(target: Path, write: Callable[[Path], None], marker: str) -> Path:
    """``write`` a folder into a staging folder beside ``target``, then rename it into place: a
    folder there is always whole. Where another process wrote the same one meanwhile (scripts
    started side by side; ``marker``, a file of a finished folder, says so), its copy stands."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(staging)
        staging.rename(target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and (target / marker).exists():
            return target
        raise
    return target


def _write_scheduler_extras(path: Path, extras: dict) -> None:
    """The keys of the hub checkpoint's scheduler_config.json that its scheduler class does not
    take, so does not save: the other schedulers built from it read them. ``clip_sample: false``
    most of all: DDIM would clip its samples without it in diffusers' pipelines that do not turn it
    off themselves (inpainting)."""
    config = json.loads(path.read_text())
    config.update({key: value for key, value in extras.items() if key not in config})
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_byte_level_clip_tokenizer(model_max_length: int, pad_token: str = "<|endoftext|>"):
    """A CLIP tokenizer with no merges, made locally: one token per byte, like CLIP's base vocab.

    The real CLIP vocabulary (49408 tokens) cannot be downloaded here; this one has CLIP's layout
    (256 byte symbols, the same with the end-of-word suffix, then the two special tokens) and
    tokenizes any text, so the pipelines run unchanged.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=model_max_length,
                         pad_token=pad_token)
