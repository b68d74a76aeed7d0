"""FLUX.1 [dev]: a 12 B rectified-flow transformer (`FluxTransformer2DModel`: 19 double-stream
and 38 single-stream blocks) over 2x2 patches of a 16-channel VAE's latents, conditioned on
T5-XXL's 512 states, CLIP-L's pooled output and a distilled guidance scale.

What differs from SD 3.x, all in this module:
- Latents are packed: each 2x2 patch of the 16-channel latent becomes one 64-wide token, and
  every token carries its (0, row, column) position for the rotary embedding; the text tokens
  carry zeros. `denoise` packs, calls the transformer and unpacks, as FluxPipeline does.
- [dev] is guidance-distilled: it takes the guidance scale as an input instead of running twice.
  Training feeds GUIDANCE = 1, the value at which the model draws the conditional distribution
  itself, which is what the photos are samples of (kohya's sd-scripts recommends 1 for FLUX
  LoRA; diffusers' trainer feeds 3.5, the sampling default). Sampling keeps the pipeline's 3.5.
- Timesteps: sigma = sigmoid(N(0, 1)), then shifted toward noise by the image's size exactly as
  the sampler shifts it (mu = 0.5 at 256 px to 1.15 at 1024 px; flow.resolution_shift): the
  model is trained on the noise levels it samples at, at every aspect bucket. (diffusers'
  trainer draws sigma uniformly and unshifted.) The transformer takes sigma itself (0..1) as its
  timestep; the trainer's timesteps are sigma * 1000, as for SD 3.x.
- Text: CLIP-L's pooled output (the projection-free pooler output) and T5's states at 512 tokens,
  always at full length (T5 sees its pads); this is FluxPipeline.encode_prompt to the bit.
"""

from __future__ import annotations

import torch

from ..tokenizers import build_t5_tokenizer
from . import flow
from .flow import training_scheduler  # noqa: F401  (the objective's table, for the probes)
from .sd import TINY_VAE, clip_model, make_scheduler
from .sd3 import CLIP_L, T5_XXL, VAE_16

KINDS = ("flux",)
PIPELINE = "FluxPipeline"
DENOISER = "transformer"
LOAD_OPTIONS: dict = {}
TEXT = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
TEXT_LENGTHS = {"tokenizer_2": 512}  # the pipeline's max_sequence_length
FIXED_LENGTH = True
FROZEN_TEXT = ("text_encoder_2",)  # T5-XXL never trains; CLIP-L may
TIME_IDS = False
# What a run's unset settings take (families.settle): as sd3.DEFAULTS, with the pipeline's
# distilled guidance 3.5 for class images and samples (training itself uses GUIDANCE).
DEFAULTS = dict(resolution=1024, max_train_steps=1000, guidance_scale=3.5,
                learning_rate=1e-5, lora_learning_rate=1e-4)
UNUSED_TEXT_PARAMETERS = False  # the pooled output reads CLIP-L's last layer
SIDE_MULTIPLE = 16  # 8x VAE, then 2x2 patches
SINGLE_FILE_TEXT: dict = {}
# kohya's LoRA names (lora.py), as its sd-scripts writes a FLUX.1 LoRA (networks/lora_flux.py) and
# ComfyUI, Forge and diffusers read one: the transformer's modules under Black Forest Labs' paths
# (lora_unet_double_blocks_0_img_attn_qkv: q/k/v fused, as transformer_file's rules fuse them),
# CLIP-L's as lora_te1_text_model_...; "flux1" is kohya's ss_base_model_version.
KOHYA = {"versions": {"flux": "flux1"},
         "prefixes": {"transformer": "lora_unet_", "text_encoder": "lora_te1_"},
         "original_unet_paths": True}
GUIDANCE = 1.0


def draw_timesteps(scheduler, n: int, generator: torch.Generator, size=None) -> torch.Tensor:
    """`n` timesteps (sigma * 1000): logit-normal sigma shifted for latents of `size` (h, w)."""
    sigma = torch.sigmoid(torch.randn(n, generator=generator))
    if size is not None and scheduler.config.get("use_dynamic_shifting"):
        tokens = (size[0] // 2) * (size[1] // 2)
        sigma = flow.time_shift(sigma, flow.resolution_shift(scheduler.config, tokens))
    return sigma * 1000


def noisy_and_target(scheduler, latents, noise, timesteps):
    """The straight line at sigma = timestep / 1000 (no table: the draws are continuous)."""
    return flow.straight_line(latents, noise, timesteps / 1000)


def loss_weights(scheduler, timesteps, config):
    """None: the plain velocity MSE, as both reference trainers use for FLUX."""
    return None


def encode_text(text_encoders: list, ids: list):
    """(T5's states, CLIP-L's pooled output)."""
    pooled = text_encoders[0](ids[0], output_hidden_states=False).pooler_output
    states = text_encoders[1](ids[1], output_hidden_states=False)[0]
    return states.to(pooled.dtype), pooled


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, h/2 * w/2, 4c): each 2x2 patch one token, row by row; a token's
    features are its channels, each as the patch's (top-left, top-right, bottom-left,
    bottom-right)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pack's inverse, for latents of height h and width w."""
    b, _, features = tokens.shape
    patches = tokens.view(b, h // 2, w // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3): each token's (0, row, column), in pack's order."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def denoise(transformer, noisy, timesteps, states, pooled, time_ids=None):
    """The transformer's velocity for noisy latents (b, 16, h, w) at timesteps sigma * 1000."""
    b, _, h, w = noisy.shape
    dtype = states.dtype
    config = getattr(transformer, "module", transformer).config  # under DDP, the model's
    guidance = (torch.full((b,), GUIDANCE, device=noisy.device, dtype=torch.float32)
                if config.guidance_embeds else None)  # [schnell] has no guidance input
    out = transformer(hidden_states=pack(noisy), timestep=timesteps.to(noisy.dtype) / 1000,
                      guidance=guidance, pooled_projections=pooled,
                      encoder_hidden_states=states,
                      txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=dtype),
                      img_ids=image_ids(h, w, noisy.device, dtype), return_dict=False)[0]
    return unpack(out, h, w)


def build(kind: str, transformer_config: dict, vae_config: dict, clip_l: dict, t5_config: dict):
    """A built-in model's pipeline (BUILTINS), its weights drawn from the current seed."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(**transformer_config)
    vae = AutoencoderKL(**vae_config)
    text_encoder, tokenizer = clip_model(CLIPTextModel, clip_l)
    tokenizer_2 = build_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(**dict({"vocab_size": len(tokenizer_2)},
                                                    **t5_config)))
    return FluxPipeline(
        transformer=transformer, scheduler=make_scheduler(SCHEDULERS[kind]), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2)


# tiny-flux: FLUX.1 [dev]'s structure (double- then single-stream blocks, rotary positions over
# (0, row, column) with the head split 4/6/6 as the real 16/56/56, the guidance embedding, the
# 16-channel VAE with FLUX's shift and scale, CLIP-L pooled and T5) at widths of 32-128.
TINY_FLUX = (
    dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=32,
         guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    dict(TINY_VAE, sample_size=1024, latent_channels=16, layers_per_block=1,
         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
         use_post_quant_conv=False),
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
         max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu"),
    dict(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=2,
         relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0),
)
# FLUX.1 [dev] at full size (11.9 B transformer, CLIP-L, T5-XXL), random weights: for GPU
# benchmarks and for counting FLOPs and memory on the meta device.
FLUX_DEV = (
    dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    dict(VAE_16, scaling_factor=0.3611, shift_factor=0.1159),
    dict(CLIP_L, projection_dim=768),
    T5_XXL,
)
BUILTINS = {"tiny-flux": ("flux", *TINY_FLUX), "random-flux-dev": ("flux", *FLUX_DEV)}
# The sampler FLUX.1 [dev] ships: flow-matching Euler, shifted by each image's size.
SCHEDULERS = {"flux": ("FlowMatchEulerDiscreteScheduler", dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096))}
