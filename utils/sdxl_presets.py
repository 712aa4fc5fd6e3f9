"""SDXL's offline presets, written as diffusers folders as utils/models.py writes SD1.5's.

- ``tiny-sdxl``: a random SDXL base of toy widths (two text encoders of different sizes, so that
  one is never mistaken for the other; the UNet's added conditions; 64x64 images), in seconds on a CPU;
- ``tiny-sdxl-refiner``: its refiner (a UNet of its own with the aesthetic score's time ids), which
  shares the base's second text encoder, tokenizer and VAE, as diffusers' documentation loads them;
- ``sdxl-random`` and ``sdxl-refiner-random``: SDXL 1.0's architectures (their config.json files),
  random weights, for GPU benchmarks that need the real compute cost but cannot reach the hub.
"""

from __future__ import annotations

from pathlib import Path

# The scheduler SDXL 1.0 ships (scheduler/scheduler_config.json of the hub checkpoints), and the
# keys of it the other schedulers read.
SDXL_SCHEDULER_CLASS = "EulerDiscreteScheduler"
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      prediction_type="epsilon", use_karras_sigmas=False)
SDXL_SCHEDULER_EXTRAS = dict(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0)
SDXL_VAE = dict(scaling_factor=0.13025, force_upcast=True)  # its VAE overflows in FP16: diffusers decodes in FP32

_TINY_TEXT = dict(intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                  vocab_size=1000)
_TINY_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=16, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8)
_TINY_VAE = dict(sample_size=64, block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 norm_num_groups=16, **SDXL_VAE)
_SDXL_UNET = dict(sample_size=128, layers_per_block=2, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, norm_num_groups=32)
_SDXL_VAE = dict(sample_size=1024, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 norm_num_groups=32, **SDXL_VAE)

# (text_encoder, text_encoder_2, unet, vae): the refiners have no first text encoder, and take the
# base's second text encoder and VAE. A UNet's projection_class_embeddings_input_dim is the pooled
# text's features and addition_time_embed_dim per time id (6; the refiner's 5).
SDXL_PRESETS = {
    "tiny-sdxl": dict(
        text_encoder=dict(hidden_size=32, projection_dim=32, **_TINY_TEXT),
        text_encoder_2=dict(hidden_size=40, projection_dim=24, **_TINY_TEXT),
        unet=dict(cross_attention_dim=72, projection_class_embeddings_input_dim=24 + 6 * 8, **_TINY_UNET),
        vae=_TINY_VAE),
    "tiny-sdxl-refiner": dict(
        base="tiny-sdxl",
        unet=dict(cross_attention_dim=40, projection_class_embeddings_input_dim=24 + 5 * 8, **_TINY_UNET)),
    "sdxl-random": dict(
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"),
        text_encoder_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu"),
        unet=dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                  projection_class_embeddings_input_dim=2816, **_SDXL_UNET),
        vae=_SDXL_VAE),
    "sdxl-refiner-random": dict(
        base="sdxl-random",
        unet=dict(block_out_channels=(384, 768, 1536, 1536), attention_head_dim=(6, 12, 24, 24),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=4, cross_attention_dim=1280, projection_class_embeddings_input_dim=2560,
                  **_SDXL_UNET)),
}


def build_sdxl_preset(name: str, models_dir: Path, seed: int = 0):
    """The preset's pipeline, random weights from ``seed`` (a refiner: its UNet; the rest is its base's,
    built first where missing). Returned unsaved: utils/models.py writes it."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from utils.models import make_byte_level_clip_tokenizer, resolve_model

    architecture = SDXL_PRESETS[name]
    scheduler = getattr(diffusers, SDXL_SCHEDULER_CLASS)(**SDXL_SCHEDULER)
    torch.manual_seed(seed)
    if "base" in architecture:
        base = diffusers.StableDiffusionXLPipeline.from_pretrained(resolve_model(architecture["base"], models_dir, seed))
        pipeline = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
            tokenizer_2=base.tokenizer_2, unet=diffusers.UNet2DConditionModel(**architecture["unet"]),
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False)
    else:
        def text_encoder(model_class, config: dict, tokenizer):
            return model_class(CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id,
                                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

        length = architecture["text_encoder"]["max_position_embeddings"]
        # SDXL's second tokenizer pads with "!", its first with the end token: their rows differ there.
        tokenizer, tokenizer_2 = make_byte_level_clip_tokenizer(length), make_byte_level_clip_tokenizer(length, "!")
        pipeline = diffusers.StableDiffusionXLPipeline(
            vae=diffusers.AutoencoderKL(**architecture["vae"]),
            text_encoder=text_encoder(CLIPTextModel, architecture["text_encoder"], tokenizer),
            text_encoder_2=text_encoder(CLIPTextModelWithProjection, architecture["text_encoder_2"], tokenizer_2),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=diffusers.UNet2DConditionModel(**architecture["unet"]),
            scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    if not name.startswith("tiny"):  # the large presets are for GPUs: half the disk, and loaded as FP16 anyway
        pipeline.to(torch.float16)
    return pipeline
