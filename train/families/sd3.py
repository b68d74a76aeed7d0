"""Stable Diffusion 3 and 3.5 (Medium, Large): the MMDiT transformer (`SD3Transformer2DModel`)
in place of a UNet, three text encoders (CLIP-L, OpenCLIP bigG, T5-XXL) and a 16-channel VAE,
trained by rectified flow (flow.py) with its timesteps drawn logit-normally from a table
shifted by 3 toward noise, as the SD3 paper trained it.

The transformer attends to one sequence: both CLIPs' penultimate hidden states side by side
(768 + 1280 wide), zero-padded to T5's width (4096), then T5's 256 states after them; and it is
conditioned on both CLIPs' pooled projections side by side (2048). T5 is bidirectional and sees
its pads (the pipeline passes no attention mask), so prompts are always encoded at their full
length. This is what StableDiffusion3Pipeline.encode_prompt computes, to the bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tokenizers import build_t5_tokenizer
from .flow import noisy_and_target, training_scheduler  # noqa: F401  (the objective)
from .flow import draw_timesteps as draw_flow_timesteps
from .sd import TINY_VAE, clip_model, make_scheduler

KINDS = ("sd3",)
PIPELINE = "StableDiffusion3Pipeline"
DENOISER = "transformer"
LOAD_OPTIONS: dict = {}
TEXT = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
        ("text_encoder_3", "tokenizer_3"))
# The pipeline's max_sequence_length for T5 (256); the CLIPs' 77 are their model_max_length.
# diffusers' reference trainers encode T5 at 77, then sample at 256: what the transformer sees
# at inference differs from what it trained on (every T5 state depends on the pads).
TEXT_LENGTHS = {"tokenizer_3": 256}
FIXED_LENGTH = True
# T5 never trains (4.9 B parameters, and no reference trains it); the CLIPs may.
FROZEN_TEXT = ("text_encoder_3",)
TIME_IDS = False
# What a run's unset settings take (families.settle), from the references (README, Families):
# SD 3.5 was trained at 1024 px; 1000 steps as replicate's and diffusers' FLUX/SD3 examples; CFG
# 4.5 as Stability's sd3_infer.py for 3.5 Large; LoRA 1e-4 as diffusers, kohya and ai-toolkit;
# a full fine-tune 1e-5 (the references' 1e-4 are for many images, not a few photos).
DEFAULTS = dict(resolution=1024, max_train_steps=1000, guidance_scale=4.5,
                learning_rate=1e-5, lora_learning_rate=1e-4)
UNUSED_TEXT_PARAMETERS = False  # the pooled projections use both CLIPs' last layers
SIDE_MULTIPLE = 16  # 8x VAE, then 2x2 patches
SINGLE_FILE_TEXT: dict = {}
# kohya's LoRA names (lora.py), as its sd-scripts writes an SD 3.x LoRA (networks/lora_sd3.py)
# and ComfyUI and Forge read one: the transformer's modules under Stability AI's paths, without
# the file's `model.diffusion_model.` (lora_unet_joint_blocks_0_x_block_attn_qkv: q/k/v fused, as
# transformer_file's rules fuse them), CLIP-L's as lora_te1_, bigG's as lora_te2_. (kohya writes
# its model variant, e.g. "5-large", as ss_base_model_version; here "sd3" names the family.)
KOHYA = {"versions": {"sd3": "sd3"},
         "prefixes": {"transformer": "lora_unet_", "text_encoder": "lora_te1_",
                      "text_encoder_2": "lora_te2_"},
         "original_unet_paths": True}


def draw_timesteps(scheduler, n: int, generator: torch.Generator, size=None) -> torch.Tensor:
    """Logit-normal(0, 1) over the shifted table: SD3's own training distribution (at every
    size: its table's shift of 3 is the paper's for 1024 px)."""
    return draw_flow_timesteps(scheduler, n, generator, "logit_normal")


def loss_weights(scheduler, timesteps, config):
    """None: the plain velocity MSE SD3 was trained with. (diffusers' reference trainer
    defaults to precondition_outputs, which amounts to an extra sigma^2 weight per row.)"""
    return None


def encode_text(text_encoders: list, ids: list):
    """(CLIP-L's and bigG's penultimate states side by side, padded to T5's width, then T5's
    states; both CLIPs' pooled projections side by side)."""
    clips = [encoder(i, output_hidden_states=True) for encoder, i in zip(text_encoders[:2], ids)]
    clip_states = torch.cat([out.hidden_states[-2] for out in clips], dim=-1)
    t5_states = text_encoders[2](ids[2])[0]
    clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    return (torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2),
            torch.cat([out[0] for out in clips], dim=-1))


def denoise(transformer, noisy, timesteps, states, pooled, time_ids=None):
    """The transformer's velocity for noisy latents at timesteps sigma * 1000."""
    return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=states,
                       pooled_projections=pooled, return_dict=False)[0]


def build(kind: str, transformer_config: dict, vae_config: dict, clip_l: dict, clip_g: dict,
          t5_config: dict):
    """A built-in model's pipeline (BUILTINS), its weights drawn from the current seed."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    transformer = SD3Transformer2DModel(**transformer_config)
    vae = AutoencoderKL(**vae_config)
    (text_encoder, tokenizer), (text_encoder_2, tokenizer_2) = (
        clip_model(CLIPTextModelWithProjection, clip_l),
        clip_model(CLIPTextModelWithProjection, clip_g))
    tokenizer_3 = build_t5_tokenizer()
    text_encoder_3 = T5EncoderModel(T5Config(**dict({"vocab_size": len(tokenizer_3)},
                                                    **t5_config)))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_scheduler(SCHEDULERS[kind]), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


# tiny-sd3: SD 3.5's structure (qk RMS-norm, the 16-channel VAE with its shift, three text
# encoders with bigG wider than CLIP-L and T5 wider than both) at widths of 32-128. The
# transformer's sin-cos position table is a saved buffer of pos_embed_max_size² rows: 64 (not
# the real 192) keeps it small and still allows 1024 px (64 patches a side).
TINY_SD3 = (
    dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=128,
         caption_projection_dim=32, pooled_projection_dim=96, pos_embed_max_size=64,
         qk_norm="rms_norm"),
    dict(TINY_VAE, sample_size=1024, latent_channels=16, layers_per_block=1,
         scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
         use_post_quant_conv=False),
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
         max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu"),
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         max_position_embeddings=77, projection_dim=64, hidden_act="gelu"),
    dict(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=2,
         relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0),
)
# SD 3.5 Large at full size (8.1 B transformer, CLIP-L, bigG, T5-XXL), random weights: for GPU
# benchmarks and for counting FLOPs and memory on the meta device.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
              hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, projection_dim=1280,
              hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
              dropout_rate=0.0)
VAE_16 = dict(sample_size=1024, in_channels=3, out_channels=3, latent_channels=16,
              layers_per_block=2, block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False,
              use_post_quant_conv=False)
SD35_LARGE = (
    dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
         attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
         caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
         qk_norm="rms_norm"),
    dict(VAE_16, scaling_factor=1.5305, shift_factor=0.0609),
    CLIP_L, CLIP_G, T5_XXL,
)
BUILTINS = {"tiny-sd3": ("sd3", *TINY_SD3), "random-sd35-large": ("sd3", *SD35_LARGE)}
# The flow-matching sampler SD 3.x ships: the table shifted by 3 toward noise.
SCHEDULERS = {"sd3": ("FlowMatchEulerDiscreteScheduler",
                      dict(num_train_timesteps=1000, shift=3.0))}
