"""The rectified-flow training objective SD 3.x and FLUX share (their families call these in place
of ddpm.py's): a noise level sigma in [0, 1] per row, the noised latent the straight line
(1 - sigma) * latents + sigma * noise, and the velocity noise - latents as the target.

How sigma is drawn is each model's own (`scheme`): SD 3.x was trained with sigma drawn
logit-normally and its table shifted by 3 toward noise; its timestep (sigma * 1000, a float) is
taken from the scheduler's own table as diffusers' reference trainers take it, so the denoiser
is trained on exactly the timesteps it samples with. FLUX.1's table is unshifted: its sampler
shifts sigma by the image's size (`resolution_shift`, `time_shift`), and flux.py shifts the
training draws the same way.

    scheduler = training_scheduler(pipe.scheduler.config)
    t = draw_timesteps(scheduler, n, generator, "logit_normal")
    noisy, target = noisy_and_target(scheduler, latents, noise, t)
    weights = loss_weights(scheduler, t, "none")
"""

from __future__ import annotations

import math

import torch

# How a row's noise level is drawn: the SD3 paper's logit-normal and mode densities, or uniform.
SCHEMES = ["uniform", "logit_normal", "mode"]
# Per-row loss weights over sigma (the SD3 paper's; "none" is what both reference trainers use).
WEIGHTINGS = ["none", "sigma_sqrt", "cosmap"]


def training_scheduler(config):
    """A fresh flow-matching scheduler from a pipeline's scheduler config, for its table of
    training sigmas. Not the pipeline's own: every sampling call overwrites that one's table."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


def draw_timesteps(scheduler, n: int, generator: torch.Generator, scheme: str = "uniform",
                   logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29) -> torch.Tensor:
    """`n` training timesteps (sigma * 1000, floats from the scheduler's table), from the seeded
    CPU generator: u in [0, 1] drawn by `scheme`, then the table's entry at u's position."""
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(logit_mean, logit_std, (n,), generator=generator))
    elif scheme == "mode":
        v = torch.rand(n, generator=generator)
        u = 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    elif scheme == "uniform":
        u = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"unknown timestep scheme {scheme!r}; one of {SCHEMES}")
    size = len(scheduler.timesteps)
    # u reaches 1.0 (a sigmoid that rounds up, or mode's v = 0): the last entry, not past it
    index = (u * size).long().clamp(0, size - 1)
    return scheduler.timesteps[index]


def sigmas_of(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Each timestep's sigma, looked up in the scheduler's table (the timesteps come from it)."""
    table = scheduler.timesteps.to(timesteps.device)
    index = (table[None, :] == timesteps[:, None].to(table.dtype)).float().argmax(1)
    return scheduler.sigmas.to(timesteps.device)[index]


def noisy_and_target(scheduler, latents, noise, timesteps):
    """The noised latents the denoiser sees, and the velocity it learns to predict."""
    return straight_line(latents, noise, sigmas_of(scheduler, timesteps))


def straight_line(latents, noise, sigma):
    """(1 - sigma) * latents + sigma * noise, per row, and the velocity noise - latents."""
    sigma = sigma.to(latents.device, latents.dtype).view(-1, *[1] * (latents.dim() - 1))
    return (1 - sigma) * latents + sigma * noise, noise - latents


def resolution_shift(config, tokens: int) -> float:
    """mu of a scheduler with use_dynamic_shifting for an image of `tokens` 2x2 patches: the
    line from base_shift at base_image_seq_len to max_shift at max_image_seq_len (FLUX.1:
    0.5 at 256 px, 1.15 at 1024 px), as its pipeline computes it before sampling."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len
                                                      - config.base_image_seq_len)
    return config.base_shift + slope * (tokens - config.base_image_seq_len)


def time_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """sigma moved toward noise as the dynamic-shifting sampler moves it:
    e^mu / (e^mu + 1/sigma - 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def loss_weights(scheduler, timesteps: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """Per-row loss weights over sigma: none (ones), sigma_sqrt (1 / sigma^2) or cosmap."""
    sigma = sigmas_of(scheduler, timesteps).float()
    if weighting == "sigma_sqrt":
        return sigma ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    if weighting == "none":
        return torch.ones_like(sigma)
    raise ValueError(f"unknown loss weighting {weighting!r}; one of {WEIGHTINGS}")
