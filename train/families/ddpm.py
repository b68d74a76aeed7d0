"""The DDPM training objective SD 1.x/2.x and SDXL share: timesteps drawn uniformly, noise added
by the scheduler, and the target its prediction_type names (the noise, or v), optionally
weighted by min-SNR. A family trained otherwise (flow.py: rectified flow) provides these
functions itself.
"""

from __future__ import annotations

import torch


def training_scheduler(config):
    """DDPM with the base model's betas and prediction type, whichever sampler it ships."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)


def loss_weights(scheduler, timesteps: torch.Tensor, config) -> torch.Tensor | None:
    """Per-row loss weights: min-SNR-gamma with snr_gamma > 0 (TrainConfig), else None."""
    return min_snr_weights(scheduler, timesteps, config.snr_gamma) if config.snr_gamma > 0 \
        else None


def draw_timesteps(scheduler, n: int, generator: torch.Generator, size=None) -> torch.Tensor:
    """`n` training timesteps, uniform over the scheduler's, from the seeded CPU generator
    (whatever the latents' `size`)."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)


def noisy_and_target(scheduler, latents, noise, timesteps):
    """The noised latents the denoiser sees, and what it learns to predict."""
    return scheduler.add_noise(latents, noise, timesteps), noise_target(scheduler, latents,
                                                                         noise, timesteps)


def noise_target(scheduler, latents, noise, timesteps):
    """What the UNet learns to predict, following the scheduler's prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for an epsilon
    target, min(SNR, gamma) / (SNR + 1) for v, where SNR = alpha_bar / (1 - alpha_bar)."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr
