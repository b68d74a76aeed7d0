"""Stable Diffusion 1.x and 2.x: one CLIP (1.x) or OpenCLIP (2.x) text encoder, whose last hidden
state the UNet attends to; no other conditioning. 2.x differs only in data (its scheduler
predicts v, its text encoder uses gelu), which the model's own configs carry.
"""

from __future__ import annotations

from ..tokenizers import build_tokenizer

# The training objective: DDPM, as every SD model was trained (re-exported for the loop).
from .ddpm import (draw_timesteps, loss_weights, noisy_and_target,  # noqa: F401
                   training_scheduler)

KINDS = ("sd1", "sd2")
PIPELINE = "StableDiffusionPipeline"
# Options for from_pretrained / from_single_file: no safety checker, and none required.
LOAD_OPTIONS = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
DENOISER = "unet"
TEXT = (("text_encoder", "tokenizer"),)
TEXT_LENGTHS: dict = {}  # CLIP's 77 (model_max_length)
FIXED_LENGTH = False  # CLIP is causal: pads trimmed from the end change no state
FROZEN_TEXT = ()  # every text encoder may train
SIDE_MULTIPLE = 8  # the VAE's downscaling
TIME_IDS = False
UNUSED_TEXT_PARAMETERS = False
# What a run's unset settings take (families.settle). replicate/dreambooth's: 2000 steps at
# 512 px, 1e-6 for a full fine-tune (a LoRA's few weights need steps about 100 times larger).
DEFAULTS = dict(resolution=512, max_train_steps=2000, guidance_scale=7.5, learning_rate=1e-6,
                lora_learning_rate=1e-4)
# In a single-file checkpoint (the original repositories' layout): the text encoder's pipeline
# attribute, its key prefix, and its layout (single_file.py converts: CLIP-L's for 1.x,
# OpenCLIP's for 2.x).
SINGLE_FILE_TEXT = {
    "sd1": (("text_encoder", "cond_stage_model.transformer.", "clip"),),
    "sd2": (("text_encoder", "cond_stage_model.model.", "open_clip"),),
}
# kohya's LoRA names (lora.py): one text encoder ("lora_te_"); UNet names are diffusers' module
# paths with "_" for ".".
KOHYA = {"versions": {"sd1": "sd_v1", "sd2": "sd_v2"},
         "prefixes": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
         "original_unet_paths": False}


def encode_text(text_encoders: list, ids: list):
    """(the encoder's last hidden state, None)."""
    return text_encoders[0](ids[0])[0], None


def denoise(unet, noisy, timesteps, states, pooled=None, time_ids=None):
    return unet(noisy, timesteps, states, added_cond_kwargs=None).sample


def build(kind: str, unet_config: dict, vae_config: dict, text_config: dict):
    """A built-in model's pipeline (BUILTINS), its weights drawn from the current seed."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    # In this order: the seed's draws give the weights every earlier release built.
    unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    text_encoder, tokenizer = clip_model(CLIPTextModel, text_config)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_scheduler(SCHEDULERS[kind]), **LOAD_OPTIONS)


def clip_model(cls, config: dict):
    """A CLIP text encoder of class `cls` from `config`, and its offline tokenizer (OpenCLIP's,
    the gelu ones, pads with "!", CLIP-L's with its end token)."""
    from transformers import CLIPTextConfig

    tokenizer = build_tokenizer("!" if config["hidden_act"] == "gelu" else "<|endoftext|>")
    config = dict({"vocab_size": len(tokenizer)}, **config, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return cls(CLIPTextConfig(**config)), tokenizer


def make_scheduler(spec: tuple[str, dict]):
    """A scheduler from a SCHEDULERS entry: (diffusers class name, config)."""
    import diffusers

    name, config = spec
    return getattr(diffusers, name)(**config)


# The built-in models' (UNet, VAE, CLIP text) configs; `build` builds them. `tiny`
# keeps SD 1.5's four down and four up blocks and two layers per block so that exporters keyed
# on that layout can be tested on it. `tiny-sd2` and `tiny-sdxl` (sdxl.py) keep their real
# model's structure (blocks, heads per block, projections, conditioning) at widths of 32-64, and
# its default image size (768 px, 1024 px).
TINY_VAE = dict(sample_size=128, in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
                scaling_factor=0.18215, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu")
SD15_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                   up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY = (
    dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
         block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
         attention_head_dim=4, **SD15_BLOCKS),
    TINY_VAE,
    TINY_CLIP,
)
# SD 2.x: `attention_head_dim` is really the number of heads in diffusers (SD 2: 5, 10, 20, 20
# heads of 64 channels); here heads of 16 channels. SD 2.1 upcasts attention to fp32.
TINY_SD2 = (
    dict(TINY[0], sample_size=96, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True,
         upcast_attention=True),
    dict(TINY_VAE, sample_size=768),
    dict(TINY_CLIP, hidden_act="gelu"),
)
SD15 = (
    dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
         block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32, cross_attention_dim=768,
         attention_head_dim=8, **SD15_BLOCKS),
    dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
         block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.18215,
         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
         num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
         hidden_act="quick_gelu"),
)
BUILTINS = {"tiny": ("sd1", *TINY), "tiny-sd2": ("sd2", *TINY_SD2),
            "random-sd15": ("sd1", *SD15)}
# Each scheduler as its reference model ships it (SD 1.5, SD 2.1-768). Training builds DDPM from
# the same config, so the betas and prediction type carry over.
SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     num_train_timesteps=1000, steps_offset=1)
SCHEDULERS = {
    "sd1": ("PNDMScheduler", dict(SCALED_LINEAR, skip_prk_steps=True, set_alpha_to_one=False)),
    "sd2": ("DDIMScheduler", dict(SCALED_LINEAR, clip_sample=False, set_alpha_to_one=False,
                                  prediction_type="v_prediction")),
}
