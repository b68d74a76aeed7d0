"""What trains and how: the trainable parameters (every weight, or LoRA adapters), AdamW and the
learning-rate schedule.

    unet_params, text_params = mark_trainable(pipe.unet, "unet", {"text_encoder": te}, config)
    optimizer = make_optimizer(config, unet_params, text_params, lr=1e-6, text_lr=1e-6)
"""

from __future__ import annotations

import torch

from .errors import UserError
from .lora import add_lora


def mark_trainable(unet, kind: str, text_encoders: dict, config) -> tuple[list, list]:
    """Mark what trains and return (denoiser parameters, text-encoder parameters) to optimize.
    `unet` is the family's denoiser (a UNet or a transformer), `kind` its pipeline attribute;
    `text_encoders` by pipeline attribute: text_encoder, and SDXL's text_encoder_2."""
    train_text = text_encoders if config.train_text_encoder else {}
    if config.use_lora:
        unet_params = add_lora(unet, config.lora_rank, config.lora_alpha, kind)
        text_params = [p for kind, model in train_text.items()
                       for p in add_lora(model, config.lora_rank, config.lora_alpha, kind)]
        return unet_params, text_params
    unet.requires_grad_(True)
    for model in train_text.values():
        model.requires_grad_(True)
    return list(unet.parameters()), [p for model in train_text.values() for p in model.parameters()]


def make_optimizer(config, unet_params: list, text_params: list, lr: float, text_lr: float):
    """AdamW over the UNet's parameters at `lr`, and the text encoders' at `text_lr`."""
    groups = [{"params": unet_params}]
    if text_params:
        groups.append({"params": text_params, "lr": text_lr})
    adam = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.use_8bit_adam:
        return bitsandbytes_adamw()(groups, **adam)
    # fused: one kernel for all tensors, 4x faster than the per-tensor loop on a CPU
    return torch.optim.AdamW(groups, fused=True, **adam)


def lr_schedule(config, schedule: str, steps: int, optimizer):
    """The learning-rate schedule `schedule` (Plan.lr_scheduler) over `steps` optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(schedule, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=steps, num_cycles=config.lr_num_cycles,
                         power=config.lr_power)


def base_weights(pipe, names: list[str], config) -> dict:
    """CPU copies of the weights before training, for extract_lora, by pipeline attribute:
    `names` are the denoiser's and the text encoders' (these only if they train)."""
    parts = names[:1] + (names[1:] if config.train_text_encoder else [])
    return {name: {k: v.detach().to("cpu", torch.float32, copy=True)
                   for k, v in getattr(pipe, name).state_dict().items()} for name in parts}


def bitsandbytes_adamw():
    """bitsandbytes' AdamW8bit, or a UserError saying how to get it (checked at intake)."""
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("use_8bit_adam needs bitsandbytes, which is not installed: "
                        "pip install bitsandbytes, or set use_8bit_adam to false") from None
    return bitsandbytes.optim.AdamW8bit
