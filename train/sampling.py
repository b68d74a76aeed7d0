"""Image generation with a pipeline: class images before training, samples after it.

Images are made in batches of `batch_size`, with a progress line per batch. Image i of a seed
starts from noise of its own seeded CPU generator: the same image on any device, at any batch
size, and whichever process of a multi-process run draws it (`first` says where a process's
share begins). Class images may use another sampler than the pipeline's own (`sampler`, the
class_scheduler setting): it is swapped in on the same pipeline for the call and the pipeline's
own put back, so samples and the exported scheduler stay the base model's.
"""

from __future__ import annotations

import time

import torch

# class_scheduler name -> (diffusers class, options over the base model's scheduler config, which
# keeps its beta schedule and prediction type). Every one starts from t=999 ("trailing"), as the
# pure noise it starts from is; DDIM must not clip: latents are not images in [-1, 1].
SAMPLERS = {
    "dpm++": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2,
                                                  timestep_spacing="trailing")),
    "ddim": ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing")),
    "euler": ("EulerDiscreteScheduler", dict(timestep_spacing="trailing")),
    "euler_a": ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing")),
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True, timestep_spacing="trailing")),
}


def sampler(pipe, name: str):
    """The scheduler a class_scheduler name means for this pipeline ("base": its own). A
    flow-matching model (SD 3.x) samples with its own flow sampler whatever the name: these
    are samplers of DDPM's noise schedule."""
    if name == "base" or "FlowMatch" in type(pipe.scheduler).__name__:
        return pipe.scheduler
    import diffusers

    cls, options = SAMPLERS[name]
    return getattr(diffusers, cls).from_config(pipe.scheduler.config, **options)


def generate(pipe, prompt: str | list[str], count: int, *, batch_size: int, steps: int,
             guidance: float, seed: int, resolution: int | tuple[int, int],
             negative_prompt: str | None = None, label: str = "images", first: int = 0,
             scheduler=None, log=print) -> list:
    """`count` PIL images of `prompt` (or of each of `count` prompts, batched together) at
    `resolution` x `resolution` (or (width, height)): images first, first+1, ... of `seed`;
    with `scheduler` in place of the pipeline's own for this call."""
    prompts = [prompt] * count if isinstance(prompt, str) else list(prompt)
    width, height = resolution if isinstance(resolution, tuple) else (resolution, resolution)
    images, start = [], time.perf_counter()
    own = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler  # on the same pipeline: no second copy of the model
    try:
        while len(images) < count:
            n = min(batch_size, count - len(images))
            index = first + len(images)
            generator = [torch.Generator().manual_seed(image_seed(seed, i))
                         for i in range(index, index + n)]
            with torch.no_grad():
                chunk = prompts[len(images):len(images) + n]
                # One prompt: encoded once, as before prompts could differ (the same pixels).
                one = len(set(chunk)) == 1
                # Only when given: FLUX.2 [klein]'s pipeline takes no negative prompt at all
                # (and its first argument is an image: the prompt goes by name).
                negative = {} if negative_prompt is None else dict(
                    negative_prompt=negative_prompt if one else [negative_prompt] * n)
                out = pipe(prompt=chunk[0] if one else chunk,
                           num_images_per_prompt=n if one else 1,
                           num_inference_steps=steps, guidance_scale=guidance, height=height,
                           width=width, generator=generator, **negative)
            images.extend(out.images)
            elapsed = time.perf_counter() - start
            log(f"{label}: {len(images)}/{count}  {len(images) / elapsed:.2f} images/s")
    finally:
        pipe.scheduler = own  # model_index.json names it too, and the export writes that
    return images


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a run seeded `seed`: distinct for every (seed, index) pair
    a run uses (seed below 2**32, fewer than 100003 images)."""
    return seed * 100003 + index
