"""Training options users ask for, each tested for its effect: offset noise, min-SNR weighting,
EMA, a separate text-encoder learning rate, and a step where text-encoder training stops.
"""

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from helpers import FAST, same_weights, train_tiny, unet_weights
from train.families.ddpm import min_snr_weights
from train.loop import draw_noise
from train.models import build_builtin

EXACT = dict(FAST, save_precision="fp32", train_text_encoder=True)


def text_weights(folder) -> dict:
    return {k.removeprefix("text_model."): v for k, v in
            load_file(folder / "text_encoder" / "model.safetensors").items()}


def distance(a: dict, b: dict) -> float:
    return sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in b) ** 0.5


@pytest.fixture(scope="module")
def base():
    pipe = build_builtin("tiny")
    return pipe.unet.state_dict(), pipe.text_encoder.state_dict()


def test_offset_noise_adds_a_constant_per_image_and_channel():
    shape = (64, 4, 8, 8)
    plain = draw_noise(shape, torch.Generator().manual_seed(0), 0.0)
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    offset = draw_noise(shape, torch.Generator().manual_seed(0), 0.5)
    shift = offset - plain
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand(shape))  # constant per channel
    assert 0.4 < shift[:, :, 0, 0].std().item() < 0.6  # of the size asked for


def test_min_snr_weights_cap_the_easy_timesteps():
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([0, 100, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    weights = min_snr_weights(scheduler, t, gamma=5.0)
    assert snr[0] > 5 and snr[-1] < 5
    torch.testing.assert_close(weights, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert weights[-1] == 1.0 and weights[0] < 0.01  # noisy steps keep full weight
    v = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    torch.testing.assert_close(min_snr_weights(v, t, 5.0),
                               torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


# A small gamma: with only 8 timesteps drawn, 5 may cap none of them.
@pytest.mark.parametrize("option", [dict(offset_noise=0.1), dict(snr_gamma=0.1)])
def test_noise_options_change_the_training(tmp_path, photos_zip, option):
    plain, _ = train_tiny(tmp_path, photos_zip, "plain", **EXACT)
    changed, _ = train_tiny(tmp_path, photos_zip, "changed", **EXACT, **option)
    assert not same_weights(unet_weights(plain), unet_weights(changed))


def test_ema_exports_the_average_which_lags_the_last_step(tmp_path, photos_zip, base):
    settings = dict(EXACT, max_train_steps=8, learning_rate=1e-3)
    raw, _ = train_tiny(tmp_path, photos_zip, "raw", **settings)
    ema, _ = train_tiny(tmp_path, photos_zip, "ema", use_ema=True, **settings)
    start = base[0]
    raw_w, ema_w = unet_weights(raw), unet_weights(ema)
    assert not same_weights(raw_w, ema_w)
    assert 0 < distance(ema_w, start) < distance(raw_w, start)
    assert same_weights(text_weights(raw), text_weights(ema))  # only the UNet is averaged


def test_text_encoder_lr_sets_the_text_encoders_rate(tmp_path, photos_zip, base):
    frozen, _ = train_tiny(tmp_path, photos_zip, "zero", text_encoder_lr=0.0, **EXACT)
    assert same_weights(text_weights(frozen), base[1])  # a rate of 0 leaves it as it was
    normal, _ = train_tiny(tmp_path, photos_zip, "normal", **EXACT)
    assert not same_weights(text_weights(normal), base[1])
    assert not same_weights(unet_weights(frozen), base[0])  # the UNet trained at its own rate


def test_text_encoder_stops_training_at_text_encoder_steps(tmp_path, photos_zip, base):
    short, _ = train_tiny(tmp_path, photos_zip, "short", **dict(EXACT, max_train_steps=2))
    stopped, _ = train_tiny(tmp_path, photos_zip, "stopped", text_encoder_steps=2,
                            **dict(EXACT, max_train_steps=4))
    # With a constant rate, the first two steps are those of the 2-step run; then it froze.
    assert same_weights(text_weights(stopped), text_weights(short))
    assert not same_weights(text_weights(short), base[1])
    assert not same_weights(unet_weights(stopped), unet_weights(short))  # the UNet kept training
