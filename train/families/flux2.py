"""FLUX.2 [klein] (4B; 9B the same at other widths): a rectified-flow transformer
(`Flux2Transformer2DModel`: double- then single-stream blocks, 4-axis rotary positions, no
guidance input) over 2x2 patches of a 32-channel VAE's latents (`AutoencoderKLFlux2`),
conditioned on Qwen3's hidden states alone (`Qwen3ForCausalLM`, frozen). Flux2KleinPipeline.

What differs from FLUX.1, all in this module (each is the pipeline's own computation, to the bit):
- Text: the prompt goes through the tokenizer's chat template first (one user message, the
  generation prompt, thinking off: `prompt_text`, which data.py applies before tokenizing),
  padded to 512 tokens; Qwen3 runs with the attention mask (ids != its pad id), and its hidden
  states after layers 9, 18 and 27 are laid side by side per token (3 x 2560 = 7680 wide for
  the 4B). The joint attention sees all 512 states, pads included: FIXED_LENGTH. There is no
  pooled embedding.
- Latents: the VAE's latents patchified 2x2 (32 -> 128 channels at half the side), then
  normalised by the VAE's batch-norm running statistics: (x - mean) / sqrt(var + eps). The
  trainer keeps them in the VAE's own layout (32 channels at 1/8 of the image side, like every
  family's latents), normalised exactly as the pipeline normalises their patches
  (`scale_latents`, data.py's hook), and `denoise` patchifies, packs (one token per patch,
  channels as features) and unpacks around the transformer. Noise drawn in this layout is the
  pipeline's noise with its entries in another order: the same Gaussian.
- Positions: 4-axis ids (t, h, w, l): an image token (0, row, column, 0), text token i
  (0, 0, 0, i).
- The transformer call: timestep = sigma (the pipeline's timestep / 1000), guidance None (the
  klein pipeline never passes one; [klein] has no guidance embedding).
- Timesteps: sigma = sigmoid(N(0, 1)), shifted toward noise by the image's size as FLUX.1's
  are (flux.py). The klein pipeline shifts by `compute_empirical_mu(tokens, steps)`, which also
  grows as the sampling steps fall (a few-step sampler spends its steps at high noise: at
  1024 px mu is 2.29 at 4 steps, 2.02 at 50). That step dependence is the sampler's budget, not
  the model's noise distribution; its many-step limit (200 steps, and every image above 4300
  tokens at any step count) is the line mu = 0.5 at 256 tokens to 1.15 at 4096 (1024 px),
  FLUX.1's own. Training draws there (`shift_mu`): the noise levels the model denoises when
  sampled finely, at every aspect bucket. (diffusers' klein trainer draws sigma uniformly,
  unshifted.) The loss is the plain velocity MSE.
- Guidance: [klein] is step- and guidance-distilled (is_distilled: the pipeline ignores the
  guidance scale); DEFAULTS' 1.0 is its scale. A [klein] base model (is_distilled false) takes
  classifier-free guidance (4.0 in diffusers' example): set class/save_guidance_scale.
- Outputs: the diffusers folder and diffusers' LoRA layout. No single-file checkpoint, no
  kohya/ComfyUI LoRA file (KOHYA None), no negative prompt (the pipeline takes none).
"""

from __future__ import annotations

import torch

from ..tokenizers import build_qwen_tokenizer
from . import flow
from .flow import training_scheduler  # noqa: F401  (the objective's table, for the probes)
from .flux import SCHEDULERS as FLUX_SCHEDULERS
from .sd import make_scheduler

KINDS = ("flux2",)
PIPELINE = "Flux2KleinPipeline"
DENOISER = "transformer"
LOAD_OPTIONS: dict = {}
TEXT = (("text_encoder", "tokenizer"),)
TEXT_LENGTHS = {"tokenizer": 512}  # the pipeline's max_sequence_length
FIXED_LENGTH = True
FROZEN_TEXT = ("text_encoder",)  # Qwen3 never trains
TIME_IDS = False
# What a run's unset settings take (families.settle): as flux.DEFAULTS, with the distilled
# [klein]'s guidance scale, 1.0 (its pipeline ignores any other: see the docstring).
DEFAULTS = dict(resolution=1024, max_train_steps=1000, guidance_scale=1.0,
                learning_rate=1e-5, lora_learning_rate=1e-4)
UNUSED_TEXT_PARAMETERS = False  # Qwen3 never trains
SIDE_MULTIPLE = 16  # 8x VAE, then 2x2 patches
SINGLE_FILE_TEXT: dict = {}
SINGLE_FILE = False  # no single-file layout written (families.check_settings refuses it)
NEGATIVE_PROMPT = False  # Flux2KleinPipeline takes none
KOHYA = None  # no kohya/ComfyUI LoRA layout written for FLUX.2: lora/ only
# Qwen3's hidden states the pipeline reads (hidden_states[0] is the embeddings).
TEXT_LAYERS = (9, 18, 27)
# compute_empirical_mu's step count from which it is one line in the image's tokens.
SHIFT_STEPS = 200


def prompt_text(tokenizer, prompt: str) -> str:
    """The text the tokenizer sees for `prompt`, as the pipeline renders it."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def loaded(pipe) -> None:
    """Give a loaded pipeline's Qwen3 the tokenizer's pad id (encode_text masks the pads by
    it), where its config names none (Qwen3's own does not)."""
    config = pipe.text_encoder.config
    if config.pad_token_id is None:
        config.pad_token_id = pipe.tokenizer.pad_token_id


def encode_text(text_encoders: list, ids: list):
    """(Qwen3's states after TEXT_LAYERS side by side per token, None): the pipeline's
    _get_qwen3_prompt_embeds. Its attention mask is the tokenizer's: every token but the pads
    (the chat-templated text holds no pad token unless the prompt spells one out)."""
    encoder, ids = text_encoders[0], ids[0]
    pad = encoder.config.pad_token_id
    if pad is None:
        raise ValueError("the Qwen3 text encoder's config names no pad_token_id (load the "
                         "pipeline with train.models.load_pipeline, or set it to the tokenizer's)")
    mask = (ids != pad).long()
    if ids.device.type == "meta":  # bench's FLOP count: transformers reads a 2-D mask's values
        mask = torch.zeros(len(ids), 1, ids.shape[1], ids.shape[1], device="meta")
    # The decoder without its LM head: the same hidden states, without 512 x vocabulary logits.
    out = getattr(encoder, "model", encoder)(input_ids=ids, attention_mask=mask,
                                             output_hidden_states=True, use_cache=False)
    states = torch.stack([out.hidden_states[k] for k in TEXT_LAYERS], dim=1)
    b, layers, length, width = states.shape
    return states.permute(0, 2, 1, 3).reshape(b, length, layers * width), None


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, 4c, h/2, w/2): channel c's 2x2 patch as channels 4c..4c+3
    (top-left, top-right, bottom-left, bottom-right)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """patchify's inverse."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(b, c // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, h * w, c): one token per position, row by row."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pack's inverse, for a grid of h x w tokens."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """(h * w, 4): each token's (0, row, column, 0), in pack's order, for a grid of h x w."""
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=-1).reshape(-1, 4)


def text_ids(length: int, device=None) -> torch.Tensor:
    """(length, 4): text token i's (0, 0, 0, i)."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def batch_norm(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's running mean and sqrt(var + eps) per patchified channel, (1, 4c, 1, 1)."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def scale_latents(vae, mean: torch.Tensor, std: torch.Tensor | None = None):
    """The denoiser's latents from the VAE's (data.py's hook): `mean` (b, 32, h, w) normalised
    patch-wise as the pipeline normalises its latents, in the VAE's layout; `std` (the latent
    distribution's) divided by the same per-patch-channel std (None stays None)."""
    bn_mean, bn_std = (t.to(mean.device, mean.dtype) for t in batch_norm(vae))
    mean = unpatchify((patchify(mean) - bn_mean) / bn_std)
    return mean, None if std is None else unpatchify(patchify(std) / bn_std)


def shift_mu(tokens: int) -> float:
    """The klein sampler's shift for an image of `tokens` patches in its many-step limit
    (compute_empirical_mu at SHIFT_STEPS): 0.5 at 256 tokens, 1.15 at 4096."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(tokens, SHIFT_STEPS)


def draw_timesteps(scheduler, n: int, generator: torch.Generator, size=None) -> torch.Tensor:
    """`n` timesteps (sigma * 1000): logit-normal sigma shifted for latents of `size` (h, w)."""
    sigma = torch.sigmoid(torch.randn(n, generator=generator))
    if size is not None and scheduler.config.get("use_dynamic_shifting"):
        sigma = flow.time_shift(sigma, shift_mu((size[0] // 2) * (size[1] // 2)))
    return sigma * 1000


def noisy_and_target(scheduler, latents, noise, timesteps):
    """The straight line at sigma = timestep / 1000 (no table: the draws are continuous)."""
    return flow.straight_line(latents, noise, timesteps / 1000)


def loss_weights(scheduler, timesteps, config):
    """None: the plain velocity MSE."""
    return None


def denoise(transformer, noisy, timesteps, states, pooled=None, time_ids=None):
    """The transformer's velocity for noisy latents (b, 32, h, w) at timesteps sigma * 1000,
    called as Flux2KleinPipeline calls it."""
    b, _, h, w = noisy.shape
    out = transformer(hidden_states=pack(patchify(noisy)),
                      timestep=timesteps.to(noisy.dtype) / 1000, guidance=None,
                      encoder_hidden_states=states,
                      txt_ids=text_ids(states.shape[1], noisy.device),
                      img_ids=image_ids(h // 2, w // 2, noisy.device), return_dict=False)[0]
    return unpatchify(unpack(out, h // 2, w // 2))


def build(kind: str, transformer_config: dict, vae_config: dict, qwen_config: dict):
    """A built-in model's pipeline (BUILTINS), its weights (and the VAE's batch-norm
    statistics) drawn from the current seed."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    transformer = Flux2Transformer2DModel(**transformer_config)
    vae = AutoencoderKLFlux2(**vae_config)
    with torch.no_grad():  # a trained VAE's statistics are not 0 and 1: normalising must show
        channels = vae.bn.running_mean.shape[0]
        vae.bn.running_mean.copy_(torch.randn(channels) * 0.5)
        vae.bn.running_var.copy_(torch.rand(channels) * 2 + 0.25)
    tokenizer = build_qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(**dict(
        {"vocab_size": len(tokenizer)}, **qwen_config, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)))
    return Flux2KleinPipeline(scheduler=make_scheduler(SCHEDULERS[kind]), vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=True)


# tiny-flux2: FLUX.2 [klein]'s structure (double- then single-stream blocks without biases, 4-axis
# rotary positions with theta 2000, no guidance embedding, the 32-channel VAE with its batch norm,
# Qwen3 with 28 layers so that layers 9, 18 and 27 are inner ones, as in the 36 of Qwen3-4B) at
# widths of 8-128.
TINY_FLUX2 = (
    dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
         num_attention_heads=2, joint_attention_dim=3 * 32, timestep_guidance_channels=32,
         axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=False),
    dict(sample_size=1024, in_channels=3, out_channels=3, latent_channels=32, layers_per_block=1,
         block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=4,
         num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
         tie_word_embeddings=True),
)
# FLUX.2 [klein] 4B at full size (3.9 B transformer, Qwen3-4B, the FLUX.2 VAE), random weights:
# for counting FLOPs and memory on the meta device, and GPU benchmarks. Configs as diffusers'
# scripts/convert_flux2_to_diffusers.py (klein-4b) and Qwen3-4B's config.json give them.
FLUX2_KLEIN_4B = (
    dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
         timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
         rope_theta=2000, eps=1e-6, guidance_embeds=False),
    dict(),  # AutoencoderKLFlux2's defaults are FLUX.2's VAE
    dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
         max_position_embeddings=40960,
         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
         tie_word_embeddings=True),
)
BUILTINS = {"tiny-flux2": ("flux2", *TINY_FLUX2),
            "random-flux2-klein": ("flux2", *FLUX2_KLEIN_4B)}
# The sampler [klein] ships: FLUX.1 [dev]'s flow-matching Euler with dynamic shifting (the klein
# pipeline computes the shift itself: compute_empirical_mu).
SCHEDULERS = {"flux2": FLUX_SCHEDULERS["flux"]}
