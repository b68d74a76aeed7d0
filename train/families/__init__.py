"""Model families: everything that differs between Stable Diffusion 1.x/2.x and SDXL, one module
each, behind the few functions the recipe, the loop, the data and the evaluation call.

    from train import families
    kind = families.of(pipe)                  # "sd1", "sd2" or "sdxl"
    fam = families.get(kind)                  # the family's module: sd or sdxl
    states, pooled = fam.encode_text(families.text_encoders(pipe), ids)
    prediction = fam.denoise(pipe.unet, noisy, timesteps, states, pooled, time_ids)

What a family module provides (see sd.py, the smallest):

    KINDS            the family names it serves, e.g. ("sd1", "sd2")
    PIPELINE         the diffusers pipeline class name its folders declare in model_index.json
    TEXT             (text encoder, tokenizer) pipeline attribute pairs, in conditioning order
    encode_text(text_encoders, ids) -> (hidden states, pooled embedding or None)
                     the denoiser's text conditioning from token ids (one tensor per encoder)
    denoise(unet, noisy, timesteps, states, pooled, time_ids) -> the denoiser's prediction
                     the one denoiser call, with whatever extra conditioning the family takes
    draw_timesteps(scheduler, n, generator), noisy_and_target(scheduler, latents, noise, t),
    noise_target(...), min_snr_weights(scheduler, t, gamma)
                     the training objective (ddpm.py: SD's and SDXL's)
    TIME_IDS         whether the denoiser takes each image's size and crop (time_ids)
    UNUSED_TEXT_PARAMETERS  whether a trained text encoder has parameters that get no gradient
                     (DDP must be told to expect them)
    LOAD_OPTIONS     options for loading its pipelines (from_pretrained, from_single_file)
    BUILTINS         built-in models: name -> (kind, UNet config, VAE config, text configs...)
    SCHEDULERS       kind -> (diffusers scheduler class, config) as its reference model ships it
    assemble(vae, unet, text_encoders, tokenizers, scheduler) -> a built-in's pipeline
    SINGLE_FILE_TEXT kind -> the text encoders' places in a single-file checkpoint
    KOHYA            kohya's LoRA naming: model version per kind, name prefix per part, and
                     whether UNet names follow diffusers' module paths or the original's

Adding a family means a module here and an entry in FAMILIES; single_file.py and lora.py hold
the SD-style key conversions these tables drive.
"""

from __future__ import annotations

from types import ModuleType

from . import sd, sdxl

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
FAMILIES = {kind: module for module in (sd, sdxl) for kind in module.KINDS}
PIPELINES = {sd.PIPELINE, sdxl.PIPELINE}
# Built-in models by name: (family, UNet config, VAE config, text encoder config, ...).
BUILTINS = {**sd.BUILTINS, **sdxl.BUILTINS}
# Where each kind's text encoders sit in a single-file checkpoint (single_file.py).
SINGLE_FILE_TEXT = {**sd.SINGLE_FILE_TEXT, **sdxl.SINGLE_FILE_TEXT}


def get(kind: str) -> ModuleType:
    """The module of family `kind` ("sd1", "sd2", "sdxl")."""
    return FAMILIES[kind]


def detect(pipeline: str, text_act: str | None, linear_projection: bool | None) -> str:
    """A family from what a model's configs say: its pipeline class name, its (first) text
    encoder's activation and whether the UNet's attention projections are linear."""
    # SD 2.x replaced CLIP-L (quick_gelu) by OpenCLIP-H (gelu) and the UNet's 1x1-conv attention
    # projections by linear ones; no SD 1.x model has either, so either one marks SD 2.x. The
    # text encoder also decides the single-file layout (CLIP or OpenCLIP keys).
    if pipeline == sdxl.PIPELINE:
        return "sdxl"
    return "sd2" if text_act == "gelu" or linear_projection else "sd1"


def of(pipe) -> str:
    """The family of a loaded pipeline."""
    return detect(type(pipe).__name__, pipe.text_encoder.config.hidden_act,
                  pipe.unet.config.use_linear_projection)


def text_names(pipe) -> list[str]:
    """The pipeline attributes of its text encoders, in conditioning order."""
    return [encoder for encoder, _ in get(of(pipe)).TEXT]


def text_encoders(pipe) -> list:
    return [getattr(pipe, encoder) for encoder, _ in get(of(pipe)).TEXT]


def tokenizers(pipe) -> list:
    return [getattr(pipe, tokenizer) for _, tokenizer in get(of(pipe)).TEXT]
