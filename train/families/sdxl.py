"""SDXL: two text encoders (CLIP-L, and OpenCLIP bigG with a projection). The UNet attends to both
encoders' penultimate hidden states side by side, and is also conditioned on the second
encoder's pooled projection and on six numbers per image (`time_ids`: original size, crop
offset, target size), as StableDiffusionXLPipeline encodes prompts.
"""

from __future__ import annotations

import torch

# The training objective: DDPM, as every SD model was trained (re-exported for the loop).
from .ddpm import (draw_timesteps, loss_weights, noisy_and_target,  # noqa: F401
                   training_scheduler)

from .sd import DEFAULTS as SD_DEFAULTS
from .sd import SCALED_LINEAR, TINY_CLIP, TINY_VAE, clip_model, make_scheduler

KINDS = ("sdxl",)
PIPELINE = "StableDiffusionXLPipeline"
LOAD_OPTIONS: dict = {}  # SDXL has no safety checker; naming one there only draws a warning
DENOISER = "unet"
TEXT = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
TEXT_LENGTHS: dict = {}  # CLIP's 77 (model_max_length)
FIXED_LENGTH = False  # CLIP is causal: pads trimmed from the end change no state
FROZEN_TEXT = ()  # every text encoder may train
SIDE_MULTIPLE = 8  # the VAE's downscaling
TIME_IDS = True
DEFAULTS = dict(SD_DEFAULTS, resolution=1024)  # SDXL was trained at 1024 px
# The UNet reads the first encoder's penultimate layer: its last layer gets no gradient.
UNUSED_TEXT_PARAMETERS = True
# In a single-file checkpoint (SGM's layout): CLIP-L, then OpenCLIP bigG.
SINGLE_FILE_TEXT = {
    "sdxl": (("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip")),
}
# kohya's LoRA names (lora.py): te1 (CLIP-L) and te2 (bigG); UNet names follow the original SGM
# module paths (input_blocks.4.1...), not diffusers'.
KOHYA = {"versions": {"sdxl": "sdxl_base_v1-0"},
         "prefixes": {"unet": "lora_unet_", "text_encoder": "lora_te1_",
                      "text_encoder_2": "lora_te2_"},
         "original_unet_paths": True}


def encode_text(text_encoders: list, ids: list):
    """(both encoders' penultimate hidden states side by side, text_encoder_2's pooled projection:
    CLIPTextModelWithProjection's first output)."""
    outputs = [encoder(i, output_hidden_states=True) for encoder, i in zip(text_encoders, ids)]
    states = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
    return states, outputs[-1][0]


def denoise(unet, noisy, timesteps, states, pooled, time_ids):
    """The UNet's prediction with the pooled text embedding and each image's time ids."""
    added = {"text_embeds": pooled, "time_ids": time_ids}
    return unet(noisy, timesteps, states, added_cond_kwargs=added).sample


def build(kind: str, unet_config: dict, vae_config: dict, clip_l: dict, clip_g: dict):
    """A built-in model's pipeline (BUILTINS), its weights drawn from the current seed."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    # The second encoder has a projection: its pooled output conditions the UNet too.
    (text_encoder, tokenizer), (text_encoder_2, tokenizer_2) = (
        clip_model(CLIPTextModel, clip_l), clip_model(CLIPTextModelWithProjection, clip_g))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=make_scheduler(SCHEDULERS[kind]))


# SDXL: a level without attention, then two with 2 transformer layers (real: 2 and 10); the UNet
# attends to both encoders' hidden states side by side (32 + 64) and is conditioned on the second
# encoder's pooled projection (32) plus six size/crop numbers of 8 Fourier features each.
TINY_SDXL = (
    dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
         block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=96,
         transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4),
         use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
         projection_class_embeddings_input_dim=32 + 6 * 8,
         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    dict(TINY_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    TINY_CLIP,
    # Wider than the first encoder, as bigG (1280) is than CLIP-L (768): diffusers' single-file
    # loader tells SDXL's two encoders apart by their widths.
    dict(TINY_CLIP, hidden_size=64, intermediate_size=128, hidden_act="gelu"),
)
BUILTINS = {"tiny-sdxl": ("sdxl", *TINY_SDXL)}
# The scheduler as SDXL base ships it.
SCHEDULERS = {
    "sdxl": ("EulerDiscreteScheduler", dict(SCALED_LINEAR, interpolation_type="linear",
                                            prediction_type="epsilon", timestep_spacing="leading",
                                            use_karras_sigmas=False)),
}
