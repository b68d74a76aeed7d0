"""Model families: everything that differs between Stable Diffusion 1.x/2.x, SDXL, SD 3.x,
FLUX.1 and FLUX.2 [klein], one module each, behind the few functions the recipe, the loop, the
data and the evaluation call.

    from train import families
    kind = families.of(pipe)                  # "sd1", "sd2", "sdxl", "sd3", "flux", "flux2"
    fam = families.get(kind)                  # the family's module: sd, sdxl, sd3, flux, flux2
    states, pooled = fam.encode_text(families.text_encoders(pipe), ids)
    prediction = fam.denoise(families.denoiser(pipe), noisy, timesteps, states, pooled, time_ids)

What a family module provides (see sd.py, the smallest):

    KINDS            the family names it serves, e.g. ("sd1", "sd2")
    PIPELINE         the diffusers pipeline class name its folders declare in model_index.json
    DENOISER         the pipeline attribute of the network that trains: "unet" or "transformer"
    TEXT             (text encoder, tokenizer) pipeline attribute pairs, in conditioning order
    TEXT_LENGTHS     tokens each tokenizer pads to, where not its model_max_length (T5's)
    FIXED_LENGTH     whether prompts must be encoded at their full padded length (a T5 or joint
                     attention sees the pads: trimming them changes every state)
    FROZEN_TEXT      text encoders that never train (T5)
    SIDE_MULTIPLE    what image sides must be a multiple of (8: the VAE; 16 with 2x2 patches)
    DEFAULTS         what a run's unset settings take (settle): resolution, max_train_steps,
                     guidance_scale (class images and samples), learning_rate (a full
                     fine-tune's) and lora_learning_rate
    encode_text(text_encoders, ids) -> (hidden states, pooled embedding or None)
                     the denoiser's text conditioning from token ids (one tensor per encoder)
    denoise(unet, noisy, timesteps, states, pooled, time_ids) -> the denoiser's prediction
                     the one denoiser call, with whatever extra conditioning the family takes
    training_scheduler(config), draw_timesteps(scheduler, n, generator, size),
    noisy_and_target(scheduler, latents, noise, t), loss_weights(scheduler, t, config)
                     the training objective (ddpm.py: SD's and SDXL's; flow.py: SD 3.x's and FLUX's)
    TIME_IDS         whether the denoiser takes each image's size and crop (time_ids)
    UNUSED_TEXT_PARAMETERS  whether a trained text encoder has parameters that get no gradient
                     (DDP must be told to expect them)
    LOAD_OPTIONS     options for loading its pipelines (from_pretrained, from_single_file)
    BUILTINS         built-in models: name -> (kind, denoiser config, VAE config, text configs...)
    SCHEDULERS       kind -> (diffusers scheduler class, config) as its reference model ships it
    build(kind, *configs) -> a built-in's pipeline, from a BUILTINS entry
    SINGLE_FILE_TEXT kind -> the text encoders' places in a single-file checkpoint
    KOHYA            kohya's LoRA naming: model version per kind, name prefix per part, and
                     whether the denoiser's names follow diffusers' module paths or the original
                     model's (SDXL's SGM UNet; SD 3.x's and FLUX's transformers, their fused
                     q/k/v as transformer_file's rules fuse them); None: no kohya layout
                     (FLUX.2: its LoRA is written in diffusers' layout only)

Optional, where a family differs (flux2.py has them all):
    prompt_text(tokenizer, prompt) -> the text the tokenizer sees (FLUX.2: the chat template)
    scale_latents(vae, mean, std) -> the denoiser's latents and their std from the VAE's
                     (default: data.latent_scale's shift and scale; FLUX.2: per-patch batch norm)
    loaded(pipe)     what a loaded pipeline needs set (FLUX.2: Qwen3's pad id, for its mask)
    SINGLE_FILE      False: no single-file output (check_settings refuses it)
    NEGATIVE_PROMPT  False: the pipeline takes no negative prompt

Adding a family means a module here and an entry in FAMILIES; single_file.py and lora.py hold
the SD-style key conversions these tables drive.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from ..errors import UserError
from . import flux, flux2, sd, sd3, sdxl

MODULES = (sd, sdxl, sd3, flux, flux2)
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD 3.x",
                "flux": "FLUX.1", "flux2": "FLUX.2 [klein]"}
FAMILIES = {kind: module for module in MODULES for kind in module.KINDS}
PIPELINES = {module.PIPELINE for module in MODULES}
# Built-in models by name: (family, denoiser config, VAE config, text encoder config, ...).
BUILTINS = {name: entry for module in MODULES for name, entry in module.BUILTINS.items()}
# Where each kind's text encoders sit in a single-file checkpoint (single_file.py).
SINGLE_FILE_TEXT = {**sd.SINGLE_FILE_TEXT, **sdxl.SINGLE_FILE_TEXT}


def get(kind: str) -> ModuleType:
    """The module of family `kind` ("sd1", "sd2", "sdxl", "sd3", "flux", "flux2")."""
    return FAMILIES[kind]


def detect(pipeline: str, text_act: str | None, linear_projection: bool | None) -> str:
    """A family from what a model's configs say: its pipeline class name, its (first) text
    encoder's activation and whether the UNet's attention projections are linear."""
    # SD 2.x replaced CLIP-L (quick_gelu) by OpenCLIP-H (gelu) and the UNet's 1x1-conv attention
    # projections by linear ones; no SD 1.x model has either, so either one marks SD 2.x. The
    # text encoder also decides the single-file layout (CLIP or OpenCLIP keys).
    for module in (sdxl, sd3, flux, flux2):  # one kind per pipeline class
        if pipeline == module.PIPELINE:
            return module.KINDS[0]
    return "sd2" if text_act == "gelu" or linear_projection else "sd1"


def of(pipe) -> str:
    """The family of a loaded pipeline."""
    unet = getattr(pipe, "unet", None)
    return detect(type(pipe).__name__, pipe.text_encoder.config.hidden_act,
                  unet.config.use_linear_projection if unet is not None else None)


def denoiser(pipe):
    """The pipeline's network that trains: its UNet, or its transformer."""
    return getattr(pipe, get(of(pipe)).DENOISER)


def default_resolution(pipe) -> int:
    """The image side a pipeline draws at by default (its denoiser's sample size in pixels)."""
    size = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size
    return size * pipe.vae_scale_factor


def text_names(pipe) -> list[str]:
    """The pipeline attributes of its text encoders, in conditioning order."""
    return [encoder for encoder, _ in get(of(pipe)).TEXT]


def text_encoders(pipe) -> list:
    return [getattr(pipe, encoder) for encoder, _ in get(of(pipe)).TEXT]


def tokenizers(pipe) -> list:
    return [getattr(pipe, tokenizer) for _, tokenizer in get(of(pipe)).TEXT]


def settle(config, kind: str):
    """`config` (a TrainConfig) with the settings it leaves unset (None) at family `kind`'s
    defaults, and the names and values of those it took; train_text_encoder off where no text
    encoder of the family trains (FLUX.2's Qwen3: its embeddings are then cached)."""
    table = get(kind).DEFAULTS
    defaults = dict(resolution=table["resolution"], max_train_steps=table["max_train_steps"],
                    class_guidance_scale=table["guidance_scale"],
                    save_guidance_scale=table["guidance_scale"],
                    learning_rate=table["lora_learning_rate" if config.use_lora
                                        else "learning_rate"])
    taken = {name: value for name, value in defaults.items() if getattr(config, name) is None}
    config = dataclasses.replace(config, **taken)
    if all(encoder in get(kind).FROZEN_TEXT for encoder, _ in get(kind).TEXT):
        config = dataclasses.replace(config, train_text_encoder=False)
    return config, taken


def check_settings(config, kind: str) -> None:
    """Refuse the settings (a TrainConfig) family `kind` cannot take, before its model loads."""
    family, name = get(kind), FAMILY_NAMES[kind]
    side = family.SIDE_MULTIPLE
    if config.resolution % side:
        raise UserError(f"{name} needs a resolution that is a multiple of {side} (got "
                        f"{config.resolution}); try {config.resolution // side * side}")
    if family.DENOISER == "unet":
        return
    # The flow-matching families: what their objective does not take.
    if config.snr_gamma > 0:
        raise UserError(f"snr_gamma (min-SNR weighting) is a DDPM weighting; {name} is "
                        f"trained by flow matching: set snr_gamma to 0")
    if "single_file" in config.formats() and not getattr(family, "SINGLE_FILE", True):
        raise UserError(f"{name} has no single-file output: set output_format to diffusers "
                        f"and/or lora")
    if config.save_sample_negative_prompt and not getattr(family, "NEGATIVE_PROMPT", True):
        raise UserError(f"{name} takes no negative prompt: leave save_sample_negative_prompt "
                        f"unset")
