"""The rectified-flow objective of SD 3.x and FLUX (train/families/flow.py), against diffusers'
own training utilities and scheduler tables: the same draws from the same generator, the same
sigmas, noised latents, targets and loss weights as the reference trainers compute."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import (compute_density_for_timestep_sampling,
                                      compute_loss_weighting_for_sd3)

from train.families import flow

# The scheduler configs SD 3.5 and FLUX.1-dev ship.
SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
        "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}


def reference_sigmas(scheduler, timesteps):
    """The diffusers reference trainers' get_sigmas: each timestep looked up in the table."""
    index = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    return scheduler.sigmas[index]


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("config", [SD3, FLUX], ids=["sd3", "flux"])
def test_timesteps_are_drawn_as_the_reference_trainers_draw_them(scheme, config):
    scheduler = flow.training_scheduler(FlowMatchEulerDiscreteScheduler(**config).config)
    ours = flow.draw_timesteps(scheduler, 256, torch.Generator().manual_seed(3), scheme)
    u = compute_density_for_timestep_sampling(scheme, 256, 0.0, 1.0, 1.29,
                                              generator=torch.Generator().manual_seed(3))
    index = (u * 1000).long()
    assert torch.equal(ours, scheduler.timesteps[index])
    sigma = flow.sigmas_of(scheduler, ours)
    assert torch.equal(sigma, reference_sigmas(scheduler, ours))
    assert torch.allclose(sigma, ours / 1000, atol=1e-6)


def test_sd3_trains_on_a_table_shifted_toward_noise_and_flux_on_a_plain_one():
    sd3, dev = (flow.training_scheduler(FlowMatchEulerDiscreteScheduler(**c).config)
                for c in (SD3, FLUX))
    plain = torch.linspace(1, 1000, 1000).flip(0) / 1000
    assert torch.allclose(dev.sigmas[:1000], plain)
    assert torch.allclose(sd3.sigmas[:1000], 3 * plain / (1 + 2 * plain))
    # uniform draws: a median noise level of 0.5 on FLUX's table, 0.75 on SD3's
    for scheduler, median in ((dev, 0.5), (sd3, 0.75)):
        t = flow.draw_timesteps(scheduler, 4000, torch.Generator().manual_seed(0))
        assert flow.sigmas_of(scheduler, t).median().item() == pytest.approx(median, abs=0.02)


def test_a_draw_at_the_top_of_the_range_takes_the_last_entry():
    scheduler = flow.training_scheduler(FlowMatchEulerDiscreteScheduler(**SD3).config)
    # logit-normal with a huge mean: the sigmoid rounds to exactly 1.0
    t = flow.draw_timesteps(scheduler, 8, torch.Generator().manual_seed(0), "logit_normal",
                            logit_mean=40.0)
    assert torch.equal(t, scheduler.timesteps[[999] * 8])


def test_the_noised_latent_lies_on_the_straight_line_and_the_target_is_the_velocity():
    scheduler = flow.training_scheduler(FlowMatchEulerDiscreteScheduler(**SD3).config)
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(4, 16, 8, 8, generator=generator), torch.randn(
        4, 16, 8, 8, generator=generator)
    t = flow.draw_timesteps(scheduler, 4, generator, "logit_normal")
    noisy, target = flow.noisy_and_target(scheduler, latents, noise, t)
    sigma = reference_sigmas(scheduler, t).view(-1, 1, 1, 1)
    assert torch.equal(noisy, (1 - sigma) * latents + sigma * noise)
    assert torch.equal(target, noise - latents)
    # the scheduler's own forward process agrees
    assert torch.allclose(noisy, scheduler.scale_noise(latents, t, noise), atol=1e-6)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_are_the_sd3_papers(weighting):
    scheduler = flow.training_scheduler(FlowMatchEulerDiscreteScheduler(**SD3).config)
    t = flow.draw_timesteps(scheduler, 64, torch.Generator().manual_seed(2))
    expected = compute_loss_weighting_for_sd3(weighting, reference_sigmas(scheduler, t))
    assert torch.allclose(flow.loss_weights(scheduler, t, weighting), expected.float())


def test_unknown_schemes_are_named():
    scheduler = flow.training_scheduler(FlowMatchEulerDiscreteScheduler(**SD3).config)
    with pytest.raises(ValueError, match="unknown timestep scheme 'beta'"):
        flow.draw_timesteps(scheduler, 1, torch.Generator(), "beta")
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        flow.loss_weights(scheduler, scheduler.timesteps[:1], "snr")
