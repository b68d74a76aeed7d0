"""Stable Diffusion 1.x and 2.x: one CLIP (1.x) or OpenCLIP (2.x) text encoder, whose last hidden
state the UNet attends to; no other conditioning. 2.x differs only in data (its scheduler
predicts v, its text encoder uses gelu), which the model's own configs carry.
"""

from __future__ import annotations

KINDS = ("sd1", "sd2")
PIPELINE = "StableDiffusionPipeline"
TEXT = (("text_encoder", "tokenizer"),)
TIME_IDS = False
UNUSED_TEXT_PARAMETERS = False


def encode_text(text_encoders: list, ids: list):
    """(the encoder's last hidden state, None)."""
    return text_encoders[0](ids[0])[0], None


def denoise(unet, noisy, timesteps, states, pooled=None, time_ids=None):
    return unet(noisy, timesteps, states, added_cond_kwargs=None).sample
