"""The DreamBooth training loop: instance and class images in one batch, the loss split in two.

Each step draws `train_batch_size` instance latents and as many class latents, noises them at
random timesteps, and asks the UNet for the noise (or v); the loss is

    MSE(instance half) + prior_loss_weight * MSE(class half)

The class half is DreamBooth's prior preservation: it keeps the model able to draw the plain
class while it learns the subject. `recipe.run` calls `train`; everything random comes from one
seeded CPU generator, so on a CPU the same seed gives bit-identical weights.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .data import TrainingData, batch_indices


def dreambooth_loss(inst_pred, inst_target, cls_pred, cls_target, prior_loss_weight: float):
    """(total, instance, class) MSE losses; the class half may be empty (no prior preservation)."""
    instance = F.mse_loss(inst_pred.float(), inst_target.float())
    if cls_pred.shape[0] == 0:
        return instance, instance, torch.zeros_like(instance)
    prior = F.mse_loss(cls_pred.float(), cls_target.float())
    return instance + prior_loss_weight * prior, instance, prior


def noise_target(scheduler, latents, noise, timesteps):
    """What the UNet learns to predict, following the scheduler's prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def train(*, accelerator, unet, text_encoder, noise_scheduler, optimizer, lr_scheduler,
          data: TrainingData, params, total_steps: int, batch_size: int,
          prior_loss_weight: float, pad_tokens: bool, max_grad_norm: float, seed: int,
          log_every: int, flip_p: float = 0.0, log=print) -> list[dict]:
    """Run `total_steps` optimizer steps; returns the loss history (one entry per step)."""
    device = accelerator.device
    generator = torch.Generator().manual_seed(seed)
    shapes = [tuple(m.shape) for m in data.inst_mean]
    batches = batch_indices(data.pairs, batch_size, generator,
                            shapes if len(set(shapes)) > 1 else None)
    train_text = data.prompt_emb is None
    num_timesteps = noise_scheduler.config.num_train_timesteps
    unet.train()
    text_encoder.train(train_text)

    history, sums, micro = [], torch.zeros(3), 0
    start = time.perf_counter()
    step = 0
    while step < total_steps:
        inst, cls = (torch.tensor(ix, dtype=torch.long) for ix in next(batches))
        # View 1 is the mirrored image, drawn with probability flip_p (only if it was cached).
        if flip_p > 0:
            views = (torch.rand(len(inst) + len(cls), generator=generator) < flip_p).long()
        else:
            views = torch.zeros(len(inst) + len(cls), dtype=torch.long)
        rows = [(data.inst_mean[i][v], data.inst_std[i][v]) for i, v in
                zip(inst.tolist(), views[:len(inst)].tolist())]
        rows += [(data.cls_mean[i][v], data.cls_std[i][v]) for i, v in
                 zip(cls.tolist(), views[len(inst):].tolist())]
        prompts = torch.cat([data.inst_prompt[inst], data.cls_prompt[cls]])
        # Without pad_tokens, prompts are padded only to the longest one in the batch.
        length = data.prompt_ids.shape[1] if pad_tokens else int(data.prompt_len[prompts].max())
        # One UNet batch per latent shape: one in all, unless aspect buckets differ.
        groups = ([range(len(rows))] if len({r[0].shape for r in rows}) == 1
                  else [range(len(inst)), range(len(inst), len(rows))])

        with accelerator.accumulate(unet, text_encoder):
            if train_text:
                states = text_encoder(data.prompt_ids[prompts.to(device), :length])[0]
            else:
                states = data.prompt_emb[prompts.to(device), :length]
            preds, targets = [], []
            for group in groups:
                mean = torch.stack([rows[r][0] for r in group])
                std = torch.stack([rows[r][1] for r in group])
                # Noise is drawn on the CPU from the seeded generator: the same on any device.
                sample_noise = torch.randn(mean.shape, generator=generator).to(device)
                noise = torch.randn(mean.shape, generator=generator).to(device)
                timesteps = torch.randint(0, num_timesteps, (len(group),), generator=generator)
                timesteps = timesteps.to(device)
                latents = mean + std * sample_noise
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                targets.append(noise_target(noise_scheduler, latents, noise, timesteps))
                preds.append(unet(noisy, timesteps, states[group.start:group.stop]).sample)
            if len(groups) == 1:  # the first len(inst) rows are instance images
                n = len(inst)
                preds, targets = [preds[0][:n], preds[0][n:]], [targets[0][:n], targets[0][n:]]
            loss, inst_loss, cls_loss = dreambooth_loss(preds[0], targets[0], preds[1],
                                                        targets[1], prior_loss_weight)
            accelerator.backward(loss)
            sums += torch.stack([loss, inst_loss, cls_loss]).detach().cpu()
            micro += 1
            if accelerator.sync_gradients:
                # An infinite limit measures the norm without clipping (0 = no clipping).
                grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm or float("inf"))
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

        if accelerator.sync_gradients:
            step += 1
            total, inst_mse, cls_mse = (sums / micro).tolist()
            elapsed = time.perf_counter() - start
            # A non-finite norm is an fp16 overflow: the scaler skipped that update. JSON has no
            # NaN or Infinity, so such values are recorded as null.
            history.append({"step": step, "loss": finite(total),
                            "instance_loss": finite(inst_mse), "class_loss": finite(cls_mse),
                            "grad_norm": finite(float(grad_norm)), "lr": lr,
                            "time": round(elapsed, 4)})
            sums, micro = torch.zeros(3), 0
            if step == 1 or step == total_steps or step % log_every == 0:
                log(progress_line(step, total_steps, total, lr, elapsed))
    return history


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def progress_line(step: int, total: int, loss: float, lr: float, elapsed: float) -> str:
    """`step 40/200 (20%)  loss 0.1234  lr 1.0e-06  8.1 steps/s  elapsed 0:05  left 0:20`"""
    rate = step / elapsed if elapsed > 0 else 0.0
    left = (total - step) / rate if rate > 0 else 0.0
    return (f"step {step}/{total} ({100 * step // total}%)  loss {loss:.4f}  lr {lr:.1e}  "
            f"{rate:.2f} steps/s  elapsed {clock(elapsed)}  left {clock(left)}")


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
