"""Training data on the device: latents cached once per image, prompts tokenized once, batches.

The VAE runs once per image here, never inside the training loop: each image's latent
distribution (mean and std) is cached and a fresh latent is sampled from it at every step, as if
the image had been encoded again. Prompts are tokenized once, padded to the tokenizer's full
length; with the text encoder frozen their embeddings are cached too. CLIP's attention is causal,
so the first L positions of a 77-token embedding equal the embedding of the prompt padded to L:
slicing gives `pad_tokens=false` (pad to the longest prompt in the batch) for free.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .intake import Example


@dataclass
class TrainingData:
    """Cached tensors for instance ("inst") and class ("cls") examples, and the prompt table."""
    inst_mean: torch.Tensor      # [n_inst, views, 4, h, w] latent distribution, scaled
    inst_std: torch.Tensor
    inst_prompt: torch.Tensor    # [n_inst] index into the prompt table
    cls_mean: torch.Tensor       # [n_cls, views, 4, h, w] (n_cls = 0 without prior preservation)
    cls_std: torch.Tensor
    cls_prompt: torch.Tensor
    prompt_ids: torch.Tensor     # [n_prompts, 77] token ids, padded to full length
    prompt_len: torch.Tensor     # [n_prompts] tokens up to and including the end token
    prompt_emb: torch.Tensor | None  # [n_prompts, 77, dim] when the text encoder is frozen
    pairs: list[tuple]           # one epoch of (instance index, class index or None)


def image_tensor(image: Image.Image, resolution: int, center_crop: bool,
                 rng: random.Random) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square (centre or random), scale to
    [-1, 1]. Returns [3, resolution, resolution] float32."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)),
            max(resolution, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


@torch.no_grad()
def encode_images(vae, examples: list[Example], resolution: int, center_crop: bool, seed: int,
                  flip: bool = False, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's latent mean and std (times the VAE's scaling factor), float32, on the VAE's
    device, shaped [n, views, 4, h, w]: view 0 as cropped, view 1 mirrored when `flip`. Random
    crops are drawn once per image from `seed`."""
    rng = random.Random(seed)
    pixels = [image_tensor(ex.image, resolution, center_crop, rng) for ex in examples]
    if flip:  # both views cached, so augmentation survives latent caching
        pixels += [p.flip(-1) for p in pixels]
    means, stds = [], []
    for i in range(0, len(pixels), batch_size):
        batch = torch.stack(pixels[i:i + batch_size]).to(vae.device, vae.dtype)
        dist = vae.encode(batch).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    views, side = 2 if flip else 1, resolution // 8
    if not means:
        shape = (0, views, vae.config.latent_channels, side, side)
        return torch.zeros(shape, device=vae.device), torch.zeros(shape, device=vae.device)
    factor = vae.config.scaling_factor

    def by_view(parts):  # [views * n, ...] -> [n, views, ...]
        return (torch.cat(parts) * factor).unflatten(0, (views, len(examples))).transpose(0, 1)

    return by_view(means), by_view(stds)


def tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to the tokenizer's full length, and each prompt's unpadded length."""
    ids = tokenizer(prompts, padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    lengths = [len(tokenizer(p, truncation=True,
                             max_length=tokenizer.model_max_length).input_ids) for p in prompts]
    return ids, torch.tensor(lengths)


def prepare(vae, text_encoder, tokenizer, instance: list[Example], classes: list[Example],
            resolution: int, center_crop: bool, cache_embeddings: bool, seed: int,
            flip: bool = False) -> TrainingData:
    """Encode every image once and tokenize every distinct caption once."""
    device = vae.device
    prompts = sorted({ex.caption for ex in instance + classes})
    index = {p: i for i, p in enumerate(prompts)}
    ids, lengths = tokenize(tokenizer, prompts)
    emb = None
    if cache_embeddings:
        with torch.no_grad():
            emb = text_encoder(ids.to(text_encoder.device))[0].float()
    inst_mean, inst_std = encode_images(vae, instance, resolution, center_crop, seed, flip)
    cls_mean, cls_std = encode_images(vae, classes, resolution, center_crop, seed + 1, flip)

    def prompt_index(examples):
        return torch.tensor([index[ex.caption] for ex in examples], dtype=torch.long)

    return TrainingData(inst_mean, inst_std, prompt_index(instance), cls_mean, cls_std,
                        prompt_index(classes), ids.to(device), lengths, emb,
                        epoch_pairs(instance, classes))


def epoch_pairs(instance: list[Example], classes: list[Example]) -> list[tuple]:
    """(instance index, class index or None) pairs of one epoch. Per concept, max(instances,
    class images) pairs, the smaller set repeating, as in diffusers' DreamBooth; an instance
    image is always paired with a class image of its own concept."""
    pairs = []
    for concept in sorted({ex.concept for ex in instance}):
        inst = [i for i, ex in enumerate(instance) if ex.concept == concept]
        cls = [i for i, ex in enumerate(classes) if ex.concept == concept]
        for j in range(max(len(inst), len(cls))):
            pairs.append((inst[j % len(inst)], cls[j % len(cls)] if cls else None))
    return pairs


def batch_indices(pairs: list[tuple], batch_size: int, generator: torch.Generator):
    """Endless (instance indices, class indices) batches: each epoch the pairs, shuffled."""
    while True:
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(pairs), batch_size):
            chunk = [pairs[i] for i in order[start:start + batch_size]]
            yield [i for i, _ in chunk], [c for _, c in chunk if c is not None]


def steps_per_epoch(n_pairs: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch of `batch_indices`."""
    return math.ceil(math.ceil(n_pairs / batch_size) / accumulation)
