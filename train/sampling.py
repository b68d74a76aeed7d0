"""Image generation with a pipeline: class images before training, samples after it.

Images are made in batches of `batch_size` from one seeded CPU generator (the same images on any
device for a given seed), with a progress line per batch.
"""

from __future__ import annotations

import time

import torch


def generate(pipe, prompt: str, count: int, *, batch_size: int, steps: int, guidance: float,
             seed: int, resolution: int, negative_prompt: str | None = None, label: str = "images",
             log=print) -> list:
    """`count` PIL images of `prompt` at `resolution` x `resolution`."""
    generator = torch.Generator().manual_seed(seed)
    images, start = [], time.perf_counter()
    while len(images) < count:
        n = min(batch_size, count - len(images))
        with torch.no_grad():
            out = pipe(prompt, negative_prompt=negative_prompt, num_images_per_prompt=n,
                       num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                       width=resolution, generator=generator)
        images.extend(out.images)
        elapsed = time.perf_counter() - start
        log(f"{label}: {len(images)}/{count}  {len(images) / elapsed:.2f} images/s")
    return images
