"""The speed choices that are on by default give the results of the plain path they replace (on a
CPU, within the stated tolerance where the order of arithmetic changes).

    .venv/bin/python -m pytest tests/test_fast_paths.py

Covered elsewhere: gradient checkpointing gives the same weights (test_training.py); cached
text embeddings equal encoding each step (test_training.py); class images by DPM-Solver++ in 25
steps are closer to the exact sample than PNDM's in 50 (test_class_images.py).
"""

import torch

from train.config import TrainConfig
from train.models import build_builtin
from train.optim import make_optimizer


def train_steps(unet, optimizer, steps: int = 5):
    """A few real training steps on fixed inputs: the gradients follow each path's own weights."""
    g = torch.Generator().manual_seed(0)
    latents, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    for step in range(steps):
        target = torch.randn(2, 4, 8, 8, generator=g)
        pred = unet(latents, torch.tensor([100 + step, 700 - step]), states).sample
        torch.nn.functional.mse_loss(pred, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_the_recipes_fused_adamw_matches_the_plain_per_tensor_loop():
    config = TrainConfig(instance_data="x.zip", instance_prompt="a photo of sks ball",
                         class_prompt="a photo of a ball")
    fast_unet, plain_unet = build_builtin("tiny").unet, build_builtin("tiny").unet
    fast = make_optimizer(config, list(fast_unet.parameters()), [], lr=1e-4, text_lr=1e-4)
    assert fast.defaults["fused"]  # what the recipe trains with
    plain = torch.optim.AdamW(plain_unet.parameters(), lr=1e-4, betas=(0.9, 0.999),
                              weight_decay=0.01, eps=1e-8, foreach=False)
    base = {k: v.clone() for k, v in plain_unet.state_dict().items()}
    fast_w, plain_w = train_steps(fast_unet, fast), train_steps(plain_unet, plain)
    # Five steps move the weights by about 5e-4; the two kernels' rounding differs by far less.
    moved = max(float((plain_w[k] - base[k]).abs().max()) for k in base)
    differ = max(float((plain_w[k] - fast_w[k]).abs().max()) for k in base)
    assert moved > 1e-4 and differ < 1e-6, (moved, differ)
