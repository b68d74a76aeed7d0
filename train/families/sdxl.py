"""SDXL: two text encoders (CLIP-L, and OpenCLIP bigG with a projection). The UNet attends to both
encoders' penultimate hidden states side by side, and is also conditioned on the second
encoder's pooled projection and on six numbers per image (`time_ids`: original size, crop
offset, target size), as StableDiffusionXLPipeline encodes prompts.
"""

from __future__ import annotations

import torch

KINDS = ("sdxl",)
PIPELINE = "StableDiffusionXLPipeline"
TEXT = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
TIME_IDS = True
# The UNet reads the first encoder's penultimate layer: its last layer gets no gradient.
UNUSED_TEXT_PARAMETERS = True


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
