"""Training data on the device: latents cached once per image, prompts tokenized once, batches.

The VAE runs once per image here, never inside the training loop: each image's latent
distribution (mean and std) is cached and a fresh latent is sampled from it at every step, as if
the image had been encoded again. Prompts are tokenized once, padded to the tokenizer's full
length (the family's, where it is not the tokenizer's: T5's); with the text encoder frozen
their embeddings are cached too. CLIP's attention is causal, so the first L positions of a
77-token embedding equal the embedding of the prompt padded to L: slicing gives
`pad_tokens=false` (pad to the longest prompt in the batch) for free. A family whose encoder
sees the pads (T5, joint attention: FIXED_LENGTH) always takes the full length.

Prompts go through the family's own encode_text (train/families): SDXL has two tokenizers and
text encoders, and its pooled projection (one vector per prompt, read at the end token, so
slicing leaves it unchanged) is cached beside the hidden states; it also takes six numbers per
image (`time_ids`: original size, crop offset, target size), cached here per image and view.

    data = prepare(families.get("sd1"), pipe.vae, families.text_encoders(pipe),
                   families.tokenizers(pipe), instance, classes, 512, center_crop=False,
                   cache_embeddings=True, seed=0)
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
    inst_mean: list[torch.Tensor]  # per image [views, c, h, w] latent distribution, scaled
    inst_std: list[torch.Tensor]
    inst_time: list[torch.Tensor]  # per image [views, 6] SDXL time ids (see time_ids)
    inst_prompt: torch.Tensor    # [n_inst] index into the prompt table
    cls_mean: list[torch.Tensor]   # likewise for class images (none without prior preservation)
    cls_std: list[torch.Tensor]
    cls_time: list[torch.Tensor]
    cls_prompt: torch.Tensor
    prompt_ids: list[torch.Tensor]  # per tokenizer [n_prompts, length] token ids, full length
    prompt_len: torch.Tensor     # [n_prompts] tokens up to and including the end token
    prompt_emb: torch.Tensor | None  # [n_prompts, tokens, dim] when the text encoders are frozen
    prompt_pooled: torch.Tensor | None  # SDXL, frozen: [n_prompts, dim] pooled projection
    pairs: list[tuple]           # one epoch of (instance index, class index or None)
    fixed_length: bool           # the family's FIXED_LENGTH: prompts are never trimmed
    # prior_source base_model (train/prior.py): per instance image, the prompt-table indices of
    # its prior prompts; and the base text encoders' embeddings of every prompt, for the base
    # model's predictions (the same as prompt_emb/prompt_pooled when the text encoder is frozen)
    prior_index: list[torch.Tensor] | None = None
    base_emb: torch.Tensor | None = None
    base_pooled: torch.Tensor | None = None


def crop_box(image_size: tuple[int, int], size: tuple[int, int], center_crop: bool,
             rng: random.Random) -> tuple[tuple[int, int], int, int]:
    """Where an image of `image_size` (width, height) is cropped to `size`: the size it is
    resized to so that it covers `size`, and the crop's left and top in that resized image
    (centred, or drawn from `rng`: two draws)."""
    width, height = size
    scale = max(width / image_size[0], height / image_size[1])
    cover = (max(width, round(image_size[0] * scale)), max(height, round(image_size[1] * scale)))
    if center_crop:
        return cover, (cover[0] - width) // 2, (cover[1] - height) // 2
    return cover, rng.randint(0, cover[0] - width), rng.randint(0, cover[1] - height)


def image_tensor(image: Image.Image, resolution: int, center_crop: bool,
                 rng: random.Random, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resize to cover `size` (default: a `resolution` square), crop it (centre or random, see
    crop_box), scale to [-1, 1]. Returns [3, height, width] float32."""
    width, height = size or (resolution, resolution)
    cover, left, top = crop_box(image.size, (width, height), center_crop, rng)
    if cover != image.size:
        image = image.resize(cover, Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + width, top + height))
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution² pixels, sides multiples of 64 (so latents
    halve cleanly through the UNet), aspect ratios from 1:2 to 2:1, the square included."""
    sizes = {(resolution, resolution)}
    for width in range(64, 2 * resolution + 1, 64):
        height = max(64, round(resolution * resolution / width / 64) * 64)
        if max(width, height) <= 2 * min(width, height):
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (on a log scale)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), b))


@torch.no_grad()
def encode_images(vae, examples: list[Example], resolution: int, center_crop: bool, seed: int,
                  flip: bool = False, buckets: list[tuple[int, int]] | None = None,
                  batch_size: int = 8, family=None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each image's latent mean and std (as the denoiser takes them: scale_latents, for
    `family`), float32, on the VAE's device: one [views, c, h, w] tensor per image, view 0 as
    cropped, view 1 mirrored when `flip`. With `buckets`, each image is cropped to the bucket
    nearest its aspect ratio, else to a square. Random crops are drawn once per image from
    `seed`."""
    rng = random.Random(seed)
    pixels = [image_tensor(ex.image, resolution, center_crop, rng, size)
              for ex, size in zip(examples, target_sizes(examples, resolution, buckets))]
    views = [[p, p.flip(-1)] if flip else [p] for p in pixels]  # both views cached
    means, stds = [None] * len(pixels), [None] * len(pixels)
    by_shape: dict[tuple, list[int]] = {}
    for i, p in enumerate(pixels):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    for group in by_shape.values():  # one VAE batch holds images of one shape
        flat = [(i, v) for i in group for v in range(len(views[i]))]
        for start in range(0, len(flat), batch_size):
            chunk = flat[start:start + batch_size]
            batch = torch.stack([views[i][v] for i, v in chunk]).to(vae.device, vae.dtype)
            dist = vae.encode(batch).latent_dist
            scaled = scale_latents(family, vae, dist.mean.float(), dist.std.float())
            for (i, v), mean, std in zip(chunk, *scaled):
                if v == 0:
                    means[i], stds[i] = [], []
                means[i].append(mean)
                stds[i].append(std)
    return [torch.stack(m) for m in means], [torch.stack(s) for s in stds]


def latent_scale(vae) -> tuple[float, float]:
    """(shift, factor): the denoiser's latents are (VAE latent - shift) * factor. SD's VAEs have
    no shift; SD 3.x's and FLUX's 16-channel ones do."""
    return vae.config.get("shift_factor") or 0.0, vae.config.scaling_factor


def scale_latents(family, vae, mean: torch.Tensor, std: torch.Tensor | None = None):
    """The denoiser's latents (and the latent distribution's std) from the VAE's: the family's
    own scale_latents (FLUX.2's patch-wise batch norm), else (mean - shift) * factor and
    std * factor (latent_scale). `std` may be None."""
    if hasattr(family, "scale_latents"):
        return family.scale_latents(vae, mean, std)
    shift, factor = latent_scale(vae)
    return (mean - shift) * factor, None if std is None else std * factor


def prompt_texts(family, tokenizer, prompts: list[str]) -> list[str]:
    """What `tokenizer` sees of each prompt: the family's prompt_text (FLUX.2's chat
    template), else the prompt itself."""
    wrap = getattr(family, "prompt_text", None)
    return [wrap(tokenizer, p) for p in prompts] if wrap else list(prompts)


def target_sizes(examples: list[Example], resolution: int,
                 buckets: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """The (width, height) each image is cropped to: its bucket, else a `resolution` square."""
    return [nearest_bucket(ex.image.size, buckets) if buckets else (resolution, resolution)
            for ex in examples]


def time_ids(examples: list[Example], resolution: int, center_crop: bool, seed: int,
             flip: bool = False, buckets: list[tuple[int, int]] | None = None
             ) -> list[torch.Tensor]:
    """SDXL's micro-conditioning for each image as `encode_images` crops it with the same
    arguments: one [views, 6] float32 tensor per image, rows (original height, original width,
    crop top, crop left, target height, target width). The original size is the photo's as it
    came (Example.size), the crop offset is in the resized image, view 1 (mirrored) has its crop
    left measured in the mirrored image. The crops are replayed: one crop_box per image from
    `random.Random(seed)`, in order, as encode_images draws them."""
    rng = random.Random(seed)
    out = []
    for ex, (width, height) in zip(examples, target_sizes(examples, resolution, buckets)):
        cover, left, top = crop_box(ex.image.size, (width, height), center_crop, rng)
        original = (ex.size[1], ex.size[0])
        rows = [(*original, top, left, height, width)]
        if flip:
            rows.append((*original, top, cover[0] - width - left, height, width))
        out.append(torch.tensor(rows, dtype=torch.float32))
    return out


def tokenize(tokenizer, prompts: list[str],
             max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded to `max_length` (default: the tokenizer's model_max_length), and each
    prompt's unpadded length."""
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt").input_ids
    lengths = [len(tokenizer(p, truncation=True, max_length=max_length).input_ids)
               for p in prompts]
    return ids, torch.tensor(lengths)


def prepare(family, vae, text_encoders: list, tokenizers: list, instance: list[Example],
            classes: list[Example], resolution: int, center_crop: bool, cache_embeddings: bool,
            seed: int, flip: bool = False, aspect_buckets: bool = False,
            prior: list[list[str]] | None = None) -> TrainingData:
    """Encode every image once and tokenize every distinct caption once (with each tokenizer of
    `family`, a module of train/families, paired with `text_encoders`). `prior` (base-model
    prior preservation): each instance image's prior prompts, tokenized too, and embedded once
    by the text encoders as they are now (the base model's)."""
    device = vae.device
    prompts = sorted({ex.caption for ex in instance + classes}
                     | {p for kept in prior or [] for p in kept})
    index = {p: i for i, p in enumerate(prompts)}
    tokenized = [tokenize(tokenizer, prompt_texts(family, tokenizer, prompts),
                          family.TEXT_LENGTHS.get(name))
                 for (_, name), tokenizer in zip(family.TEXT, tokenizers)]
    ids = [i.to(device) for i, _ in tokenized]
    # Slicing to the longer of the two lengths keeps each encoder's end token.
    lengths = torch.stack([n for _, n in tokenized]).amax(0)
    emb = pooled = None
    if cache_embeddings or prior:
        with torch.no_grad():
            emb, pooled = family.encode_text(text_encoders,
                                      [i.to(e.device) for i, e in zip(ids, text_encoders)])
        emb, pooled = emb.float(), pooled.float() if pooled is not None else None
    buckets = bucket_sizes(resolution) if aspect_buckets else None  # class images stay square
    inst_mean, inst_std = encode_images(vae, instance, resolution, center_crop, seed, flip,
                                        buckets, family=family)
    cls_mean, cls_std = encode_images(vae, classes, resolution, center_crop, seed + 1, flip,
                                      family=family)

    def prompt_index(examples):
        return torch.tensor([index[ex.caption] for ex in examples], dtype=torch.long)

    return TrainingData(
        inst_mean=inst_mean, inst_std=inst_std,
        inst_time=time_ids(instance, resolution, center_crop, seed, flip, buckets),
        inst_prompt=prompt_index(instance), cls_mean=cls_mean, cls_std=cls_std,
        cls_time=time_ids(classes, resolution, center_crop, seed + 1, flip),
        cls_prompt=prompt_index(classes), prompt_ids=ids, prompt_len=lengths,
        prompt_emb=emb if cache_embeddings else None,
        prompt_pooled=pooled if cache_embeddings else None, pairs=epoch_pairs(instance, classes),
        fixed_length=family.FIXED_LENGTH,
        prior_index=[torch.tensor([index[p] for p in kept]) for kept in prior] if prior else None,
        base_emb=emb if prior else None, base_pooled=pooled if prior else None)


@dataclass
class RowGroup:
    """Rows of one latent shape: their latent distributions and SDXL time ids, and which of them
    (indices into the group) are this process's."""
    mean: torch.Tensor           # [rows, 4, h, w]
    std: torch.Tensor
    time_ids: torch.Tensor       # [rows, 6]
    mine: torch.Tensor           # indices of this process's rows


@dataclass
class Batch:
    """One step's examples. The groups hold the whole global batch (every process's rows, so
    that noise is drawn for all of them alike); the prompts are this process's rows'."""
    groups: list[RowGroup]       # one, unless aspect buckets give instance and class rows
    prompts: torch.Tensor        # this process's rows' indices into the prompt table
    length: int | None           # tokens the prompts are sliced to (None: all, as tokenized)
    n_instance: int              # this process's instance rows, which come first
    instance: torch.Tensor       # the global batch's instance images (indices), in row order


def draw_batch(data: TrainingData, pending: list, generator: torch.Generator, *,
               batch_size: int, processes: int = 1, rank: int = 0, flip_p: float = 0.0,
               pad_tokens: bool = False) -> Batch:
    """The next batch of the epoch (`pending`: the batches it has left, refilled with a new
    epoch when empty), with each row's view drawn (mirrored with probability `flip_p`).
    Several processes draw the same global batch of batch_size x processes pairs; each takes
    its slice of the instance rows and of the class rows."""
    if not pending:  # a new epoch; with aspect buckets, a batch holds one latent shape
        shapes = [tuple(m.shape) for m in data.inst_mean]
        pending += epoch_batches(data.pairs, batch_size * processes, generator,
                                 shapes if len(set(shapes)) > 1 else None, fill=processes > 1)
    inst, cls = (torch.tensor(ix, dtype=torch.long) for ix in pending.pop(0))
    n_inst, n_cls = len(inst) // processes, len(cls) // processes
    mine = set(range(rank * n_inst, (rank + 1) * n_inst)) | set(
        range(len(inst) + rank * n_cls, len(inst) + (rank + 1) * n_cls))
    # View 1 is the mirrored image, drawn with probability flip_p (only if it was cached).
    if flip_p > 0:
        views = (torch.rand(len(inst) + len(cls), generator=generator) < flip_p).long()
    else:
        views = torch.zeros(len(inst) + len(cls), dtype=torch.long)
    rows = [(data.inst_mean[i][v], data.inst_std[i][v], data.inst_time[i][v]) for i, v in
            zip(inst.tolist(), views[:len(inst)].tolist())]
    rows += [(data.cls_mean[i][v], data.cls_std[i][v], data.cls_time[i][v]) for i, v in
             zip(cls.tolist(), views[len(inst):].tolist())]
    prompts = torch.cat([data.inst_prompt[inst], data.cls_prompt[cls]])
    # Without pad_tokens, prompts are padded only to the longest one in the (global) batch.
    length = None if pad_tokens or data.fixed_length else int(data.prompt_len[prompts].max())
    # One UNet batch per latent shape: one in all, unless aspect buckets differ.
    spans = ([range(len(rows))] if len({r[0].shape for r in rows}) == 1
             else [range(len(inst)), range(len(inst), len(rows))])
    groups = [RowGroup(*(torch.stack([rows[r][k] for r in span]) for k in range(3)),
                       mine=torch.tensor([j for j, r in enumerate(span) if r in mine]))
              for span in spans]
    return Batch(groups, prompts[torch.tensor(sorted(mine))], length, n_inst, inst)


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


def epoch_batches(pairs: list[tuple], batch_size: int, generator: torch.Generator,
                  shapes: list | None = None, fill: bool = False) -> list[tuple[list, list]]:
    """One epoch of (instance indices, class indices) batches: the pairs, shuffled. With
    `shapes` (one per instance image), a batch holds instance images of one shape only.
    `fill` makes every batch full, the last of each shape topped up from the start of the
    epoch (several processes split each batch evenly). A plain list, so that a checkpoint can
    store the batches an epoch has left."""
    order = torch.randperm(len(pairs), generator=generator).tolist()
    groups: dict = {}
    for i in order:
        groups.setdefault(shapes[pairs[i][0]] if shapes else None, []).append(pairs[i])
    if fill:
        for group in groups.values():
            group += [group[j % len(group)] for j in range(-len(group) % batch_size)]
    batches = [group[start:start + batch_size] for group in groups.values()
               for start in range(0, len(group), batch_size)]
    if len(groups) > 1:  # interleave the shapes across the epoch
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
    return [([i for i, _ in chunk], [c for _, c in chunk if c is not None]) for chunk in batches]


def steps_per_epoch(n_pairs: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch of `epoch_batches`."""
    return math.ceil(math.ceil(n_pairs / batch_size) / accumulation)
