"""The DreamBooth training loop: instance and class images in one batch, the loss split in two.

Each step draws `train_batch_size` instance latents and as many class latents, noises them at
random timesteps, and asks the UNet for the noise (or v); the loss is

    MSE(instance half) + prior_loss_weight * MSE(class half)

The class half is DreamBooth's prior preservation: it keeps the model able to draw the plain
class while it learns the subject. `recipe.run` calls `train` once per stretch between
checkpoints; everything the loop draws at random comes from the one seeded CPU generator in
`LoopState`, so on a CPU the same seed gives bit-identical weights, and a run resumed from a
checkpoint (which stores that state) ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .data import TrainingData, epoch_batches


class Diverged(UserError):
    """The loss or the gradients stopped being finite numbers: training cannot go on."""


@dataclass
class LoopState:
    """Where training stands: all a checkpoint needs besides weights and optimizer."""
    step: int                    # optimizer steps done
    generator: torch.Generator   # batch order, noise, timesteps, flips
    pending: list = field(default_factory=list)  # batches the current epoch has left
    history: list[dict] = field(default_factory=list)
    elapsed: float = 0.0         # seconds spent training, across resumes

    @classmethod
    def start(cls, seed: int) -> LoopState:
        return cls(0, torch.Generator().manual_seed(seed))


def dreambooth_loss(inst_pred, inst_target, cls_pred, cls_target, prior_loss_weight: float,
                    weights: torch.Tensor | None = None):
    """(total, instance, class) MSE losses; the class half may be empty (no prior preservation).
    `weights` (one per row, instance rows first) weights each example's MSE, e.g. min-SNR."""
    n = inst_pred.shape[0]
    per_row = [((p.float() - t.float()) ** 2).flatten(1).mean(1)
               for p, t in ((inst_pred, inst_target), (cls_pred, cls_target))]
    if weights is not None:
        per_row = [per_row[0] * weights[:n], per_row[1] * weights[n:]]
    instance = per_row[0].mean()
    if cls_pred.shape[0] == 0:
        return instance, instance, torch.zeros_like(instance)
    prior = per_row[1].mean()
    return instance + prior_loss_weight * prior, instance, prior


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


def draw_noise(shape, generator: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise; with `offset`, plus a constant per image and channel (offset noise), which
    lets the model shift an image's mean brightness. No extra draw when the offset is 0."""
    noise = torch.randn(shape, generator=generator)
    if offset > 0:
        noise += offset * torch.randn(shape[:2] + (1, 1), generator=generator)
    return noise


def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float, step: int):
    """One EMA step; the decay warms up as (1+n)/(10+n) so early weights do not dominate."""
    rate = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - rate)


def train(*, accelerator, family, unet, text_encoders, noise_scheduler, optimizer, lr_scheduler,
          data: TrainingData, params, state: LoopState, until: int, total_steps: int,
          config, prior_loss_weight: float, log_every: int, ema: list | None = None,
          ema_params: list | None = None, log=print) -> LoopState:
    """Train from `state.step` to `until` optimizer steps (of `total_steps` in the run).
    `family` (a module of train/families) encodes the prompts with `text_encoders` and calls
    the UNet with its extra conditioning (SDXL: the pooled text embedding, each image's time ids). `config` (a TrainConfig) gives
    the per-step settings: batch size, pad_tokens, flip_p, offset_noise, snr_gamma,
    max_grad_norm, text_encoder_steps. Raises Diverged before an update that a non-finite loss
    or gradient would poison."""
    device = accelerator.device
    generator = state.generator
    # Several processes: every one draws the same global batch (train_batch_size per process)
    # with the same noise and timesteps, and trains on its slice; DDP averages the gradients.
    # So N processes take the steps one process would with N times the batch.
    world, rank = accelerator.num_processes, accelerator.process_index
    shapes = [tuple(m.shape) for m in data.inst_mean]
    shapes = shapes if len(set(shapes)) > 1 else None
    num_timesteps = noise_scheduler.config.num_train_timesteps
    fp16_scaler = accelerator.scaler is not None  # it skips overflowed steps by itself
    unet.train()

    sums, micro = torch.zeros(3), 0
    start = time.perf_counter() - state.elapsed
    while state.step < until:
        # The text encoder trains while the cache is empty, up to text_encoder_steps; after
        # that it runs without gradients, and AdamW skips parameters that have none.
        train_text = data.prompt_emb is None and not (
            config.text_encoder_steps and state.step >= config.text_encoder_steps)
        for text_encoder in text_encoders:
            text_encoder.train(train_text)
        if not state.pending:
            state.pending = epoch_batches(data.pairs, config.train_batch_size * world,
                                          generator, shapes, fill=world > 1)
        inst, cls = (torch.tensor(ix, dtype=torch.long) for ix in state.pending.pop(0))
        # This process's rows of the global batch: its instance images, then its class images.
        n_inst, n_cls = len(inst) // world, len(cls) // world
        mine = set(range(rank * n_inst, (rank + 1) * n_inst)) | set(
            range(len(inst) + rank * n_cls, len(inst) + (rank + 1) * n_cls))
        # View 1 is the mirrored image, drawn with probability flip_p (only if it was cached).
        if config.flip_p > 0:
            views = (torch.rand(len(inst) + len(cls), generator=generator)
                     < config.flip_p).long()
        else:
            views = torch.zeros(len(inst) + len(cls), dtype=torch.long)
        rows = [(data.inst_mean[i][v], data.inst_std[i][v], data.inst_time[i][v]) for i, v in
                zip(inst.tolist(), views[:len(inst)].tolist())]
        rows += [(data.cls_mean[i][v], data.cls_std[i][v], data.cls_time[i][v]) for i, v in
                 zip(cls.tolist(), views[len(inst):].tolist())]
        prompts = torch.cat([data.inst_prompt[inst], data.cls_prompt[cls]])
        # Without pad_tokens, prompts are padded only to the longest one in the batch.
        length = (data.prompt_ids[0].shape[1] if config.pad_tokens
                  else int(data.prompt_len[prompts].max()))
        # One UNet batch per latent shape: one in all, unless aspect buckets differ.
        groups = ([range(len(rows))] if len({r[0].shape for r in rows}) == 1
                  else [range(len(inst)), range(len(inst), len(rows))])

        local = torch.tensor(sorted(mine))
        prompts = prompts[local].to(device)  # padded to the global batch's longest, above

        with accelerator.accumulate(unet, *text_encoders):
            if data.prompt_emb is not None:
                states = data.prompt_emb[prompts, :length]
                pooled = (data.prompt_pooled[prompts]
                          if data.prompt_pooled is not None else None)
            else:
                with torch.set_grad_enabled(train_text):
                    states, pooled = family.encode_text(text_encoders, [
                        ids[prompts, :length] for ids in data.prompt_ids])
            preds, targets, all_t = [], [], []
            done = 0  # local rows so far: states and pooled follow the local order
            for group in groups:
                mean = torch.stack([rows[r][0] for r in group])
                std = torch.stack([rows[r][1] for r in group])
                # Noise is drawn on the CPU from the seeded generator: the same on any device
                # and in every process, for the whole global batch.
                sample_noise = torch.randn(mean.shape, generator=generator)
                noise = draw_noise(mean.shape, generator, config.offset_noise)
                timesteps = torch.randint(0, num_timesteps, (len(group),), generator=generator)
                keep = torch.tensor([j for j, r in enumerate(group) if r in mine])
                mean, std, sample_noise, noise, timesteps = (
                    t[keep].to(device) for t in (mean, std, sample_noise, noise, timesteps))
                latents = mean + std * sample_noise
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                targets.append(noise_target(noise_scheduler, latents, noise, timesteps))
                part = slice(done, done + len(keep))
                done += len(keep)
                # SDXL's size and crop conditioning, with the pooled text embedding.
                time_ids = (torch.stack([rows[group[j]][2] for j in keep.tolist()]).to(device)
                            if family.TIME_IDS else None)
                preds.append(family.denoise(unet, noisy, timesteps, states[part],
                                            None if pooled is None else pooled[part], time_ids))
                all_t.append(timesteps)
            if len(groups) == 1:  # the first n_inst local rows are instance images
                preds = [preds[0][:n_inst], preds[0][n_inst:]]
                targets = [targets[0][:n_inst], targets[0][n_inst:]]
            weights = (min_snr_weights(noise_scheduler, torch.cat(all_t), config.snr_gamma)
                       if config.snr_gamma > 0 else None)
            loss, inst_loss, cls_loss = dreambooth_loss(preds[0], targets[0], preds[1],
                                                        targets[1], prior_loss_weight, weights)
            accelerator.backward(loss)
            sums += torch.stack([loss, inst_loss, cls_loss]).detach().cpu()
            micro += 1
            if accelerator.sync_gradients:
                if world > 1:  # the loss of the global batch, the same in every process
                    sums = accelerator.reduce(sums.to(device), reduction="mean").cpu()
                # An infinite limit measures the norm without clipping (0 = no clipping).
                grad_norm = accelerator.clip_grad_norm_(
                    params, config.max_grad_norm or float("inf"))
                total = float(sums[0] / micro)
                if not math.isfinite(total) or not (fp16_scaler
                                                    or math.isfinite(float(grad_norm))):
                    raise Diverged(divergence_message(state.step + 1, total, float(grad_norm),
                                                      optimizer.param_groups[0]["lr"],
                                                      accelerator.mixed_precision))
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

        if accelerator.sync_gradients:
            state.step += 1
            if ema is not None:
                ema_update(ema, ema_params, config.ema_decay, state.step - 1)
            total, inst_mse, cls_mse = (sums / micro).tolist()
            state.elapsed = time.perf_counter() - start
            # A non-finite norm is an fp16 overflow: the scaler skipped that update. JSON has no
            # NaN or Infinity, so such values are recorded as null.
            state.history.append({"step": state.step, "loss": finite(total),
                                  "instance_loss": finite(inst_mse),
                                  "class_loss": finite(cls_mse),
                                  "grad_norm": finite(float(grad_norm)), "lr": lr,
                                  "time": round(state.elapsed, 4)})
            sums, micro = torch.zeros(3), 0
            if state.step == 1 or state.step == total_steps or state.step % log_every == 0:
                log(progress_line(state.step, total_steps, total, lr, state.elapsed))
    return state


def divergence_message(step: int, loss: float, grad_norm: float, lr: float,
                       precision: str) -> str:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    cause = ("fp16 overflowed (try mixed_precision bf16, or no) or the learning rate "
             if precision == "fp16" else "the learning rate ")
    return (f"training diverged at step {step} ({what}): {cause}{lr:.1e} is likely too high; "
            f"lower it (full fine-tuning usually works at 1e-6 to 5e-6, LoRA at 1e-4)")


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def progress_line(step: int, total: int, loss: float, lr: float, elapsed: float) -> str:
    """`step 40/200 (20%)  loss 0.1234  lr 1.0e-06  8.1 steps/s  elapsed 0:05  left 0:20`.
    `elapsed` is training time only, summed across resumes."""
    rate = step / elapsed if elapsed > 0 else 0.0
    left = (total - step) / rate if rate > 0 else 0.0
    return (f"step {step}/{total} ({100 * step // total}%)  loss {loss:.4f}  lr {lr:.1e}  "
            f"{rate:.2f} steps/s  elapsed {clock(elapsed)}  left {clock(left)}")


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
