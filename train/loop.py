"""The DreamBooth training loop: instance and class images in one batch, the loss split in two.

Each step draws `train_batch_size` instance latents and as many class latents, noises them at
random timesteps, and asks the denoiser (a UNet, or a transformer) for what the family's
objective names (the noise, v, or the flow's velocity); the loss is

    MSE(instance half) + prior_loss_weight * MSE(class half)

(+ context_loss_weight * MSE(the base model's context rows) with class_images+base_model)

The class half is DreamBooth's prior preservation: it keeps the model able to draw the plain
class while it learns the subject. With prior_source base_model (train/prior.py) there are no
class images: the class half is each photo's noisy latent again, under a prior prompt, and its
target the base model's prediction for it instead of the noise. With class_images+base_model
the class half is the class images, and each class image's noisy latent again under one of the
prior prompts, with the base model's prediction as its target.

`recipe.run` calls `train` once per stretch between checkpoints, with the `Training` it
prepared; each step's rows come from data.draw_batch, and the family (train/families) encodes
the prompts and calls the denoiser. Everything the loop draws
at random comes from the one seeded CPU generator in `LoopState`, so on a CPU the same seed gives
bit-identical weights, and a run resumed from a checkpoint (which stores that state) ends
exactly where an uninterrupted one does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .data import TrainingData, draw_batch
from .errors import UserError
from .prior import base_prediction


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
                    weights: torch.Tensor | None = None, contexts: int = 0,
                    context_weight: float = 0.0):
    """(total, instance, class) MSE losses; the class half may be empty (no prior preservation).
    `weights` (one per row, instance rows first) weights each example's MSE, e.g. min-SNR.
    `contexts`: how many of the class half's rows, its last, are the base model's rows for
    prior_prompts beside class images (class_images+base_model); their mean is weighted
    `context_weight` apart from the class images'. The class loss reported is the whole class
    half's mean either way."""
    n = inst_pred.shape[0]
    per_row = [((p.float() - t.float()) ** 2).flatten(1).mean(1)
               for p, t in ((inst_pred, inst_target), (cls_pred, cls_target))]
    if weights is not None:
        per_row = [per_row[0] * weights[:n], per_row[1] * weights[n:]]
    instance = per_row[0].mean()
    if cls_pred.shape[0] == 0:
        return instance, instance, torch.zeros_like(instance)
    prior = per_row[1].mean()
    if contexts:
        images, kept = per_row[1][:-contexts], per_row[1][-contexts:]
        return (instance + prior_loss_weight * images.mean() + context_weight * kept.mean(),
                instance, prior)
    return instance + prior_loss_weight * prior, instance, prior


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


@dataclass
class Training:
    """What the loop trains and with what: the models as accelerate prepared them, the
    optimizer, the schedules, the trainable tensors by name, and the EMA of the denoiser's."""
    denoiser: object             # the UNet, or the transformer (families: DENOISER)
    text_encoders: list          # [text_encoder], or SDXL's two
    optimizer: object
    lr_scheduler: object
    noise_scheduler: object      # the family's training_scheduler (DDPM, or the flow's table)
    params: list                 # every trainable parameter, for gradient clipping
    trainable: dict              # "unet.<name>" / "text_encoder.<name>" -> parameter
    ema: dict | None             # denoiser parameter name -> its moving average (use_ema)
    base_weights: dict | None    # the weights before training, for extract_lora
    base_denoiser: object = None  # the frozen base denoiser of a full fine-tune's base prior
    denoiser_name: str = "unet"  # its pipeline attribute: the prefix of its trainable names
    shards: dict = field(default_factory=dict)  # fsdp: sharded model's attribute -> its class

    @property
    def ema_names(self) -> list[str]:
        return [n for n in self.trainable if n.startswith(self.denoiser_name + ".")]


def train(accelerator, family, training: Training, data: TrainingData, state: LoopState,
          plan, config, until: int, log=print) -> LoopState:
    """Train from `state.step` to `until` optimizer steps (of `plan.steps` in the run).
    `family` (a module of train/families) encodes the prompts and calls the denoiser with its
    extra conditioning. `config` (a TrainConfig) gives the per-step settings: batch size,
    pad_tokens, flip_p, offset_noise, snr_gamma, max_grad_norm, text_encoder_steps, ema_decay.
    Raises Diverged before an update that a non-finite loss or gradient would poison."""
    device, generator = accelerator.device, state.generator
    denoiser, text_encoders = training.denoiser, training.text_encoders
    scheduler = training.noise_scheduler
    optimizer = training.optimizer
    prior_loss_weight = config.prior_loss_weight if config.with_prior_preservation else 0.0
    base_prior = data.prior_index is not None
    # The base model's rows are the photos' (base_model) or the class images' (with them).
    on_class_rows = base_prior and bool(data.cls_mean)
    ema = list(training.ema.values()) if training.ema else None
    ema_params = [training.trainable[n] for n in training.ema_names] if ema else None
    # Several processes: every one draws the same global batch (train_batch_size per process)
    # with the same noise and timesteps, and trains on its slice; DDP averages the gradients.
    # So N processes take the steps one process would with N times the batch.
    world, rank = accelerator.num_processes, accelerator.process_index
    fp16_scaler = accelerator.scaler is not None  # it skips overflowed steps by itself
    denoiser.train()

    sums, micro = torch.zeros(3), 0
    start = time.perf_counter() - state.elapsed
    while state.step < until:
        # The text encoder trains while the cache is empty, up to text_encoder_steps; after
        # that it runs without gradients, and AdamW skips parameters that have none.
        train_text = data.prompt_emb is None and not (
            config.text_encoder_steps and state.step >= config.text_encoder_steps)
        for text_encoder in text_encoders:
            text_encoder.train(train_text)
        batch = draw_batch(data, state.pending, generator, batch_size=config.train_batch_size,
                           processes=world, rank=rank, flip_p=config.flip_p,
                           pad_tokens=config.pad_tokens)
        prompts, length = batch.prompts, batch.length
        if base_prior:  # each instance row's prior prompts, drawn for the global batch
            prior_rows, prior, length = prior_prompts(data, batch, generator, rank,
                                                      on_class_rows)
            prompts = torch.cat([prompts, prior])
        prompts = prompts.to(device)

        with accelerator.accumulate(denoiser, *text_encoders):
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
            for group in batch.groups:
                # Noise is drawn on the CPU from the seeded generator: the same on any device
                # and in every process, for the whole global batch.
                sample_noise = torch.randn(group.mean.shape, generator=generator)
                noise = draw_noise(group.mean.shape, generator, config.offset_noise)
                timesteps = family.draw_timesteps(scheduler, len(group.mean), generator,
                                                  size=tuple(group.mean.shape[-2:]))
                mean, std, sample_noise, noise, timesteps = (
                    t[group.mine].to(device)
                    for t in (group.mean, group.std, sample_noise, noise, timesteps))
                latents = mean + std * sample_noise
                noisy, target = family.noisy_and_target(scheduler, latents, noise, timesteps)
                time_ids = group.time_ids[group.mine].to(device) if family.TIME_IDS else None
                # The rows again, under their prior prompts: in the last group, which holds the
                # class rows (after the instance rows when both share one latent shape).
                if base_prior and group is batch.groups[-1] and len(prior_rows):
                    offset = batch.n_instance if on_class_rows and len(batch.groups) == 1 else 0
                    rows, kept = prior_rows.to(device) + offset, prompts[done + len(noisy):]
                    target = torch.cat([target, base_prediction(
                        accelerator, family, denoiser, training.base_denoiser, noisy[rows],
                        timesteps[rows], data.base_emb[kept, :length],
                        None if data.base_pooled is None else data.base_pooled[kept],
                        None if time_ids is None else time_ids[rows])])
                    noisy, timesteps = torch.cat([noisy, noisy[rows]]), torch.cat(
                        [timesteps, timesteps[rows]])
                    time_ids = None if time_ids is None else torch.cat([time_ids,
                                                                        time_ids[rows]])
                targets.append(target)
                part = slice(done, done + len(noisy))
                done += len(noisy)
                preds.append(family.denoise(denoiser, noisy, timesteps, states[part],
                                            None if pooled is None else pooled[part], time_ids))
                all_t.append(timesteps)
            if len(batch.groups) == 1:  # the first n_instance local rows are instance images
                n = batch.n_instance
                preds, targets = [preds[0][:n], preds[0][n:]], [targets[0][:n], targets[0][n:]]
            weights = family.loss_weights(scheduler, torch.cat(all_t), config)
            loss, inst_loss, cls_loss = dreambooth_loss(
                preds[0], targets[0], preds[1], targets[1], prior_loss_weight, weights,
                contexts=len(prior_rows) if on_class_rows else 0,
                context_weight=config.context_loss_weight)
            accelerator.backward(loss)
            sums += torch.stack([loss, inst_loss, cls_loss]).detach().cpu()
            micro += 1
            if accelerator.sync_gradients:
                if world > 1:  # the loss of the global batch, the same in every process
                    sums = accelerator.reduce(sums.to(device), reduction="mean").cpu()
                # An infinite limit measures the norm without clipping (0 = no clipping).
                grad_norm = accelerator.clip_grad_norm_(
                    training.params, config.max_grad_norm or float("inf"))
                total = float(sums[0] / micro)
                if not math.isfinite(total) or not (fp16_scaler
                                                    or math.isfinite(float(grad_norm))):
                    raise Diverged(divergence_message(state.step + 1, total, float(grad_norm),
                                                      optimizer.param_groups[0]["lr"],
                                                      accelerator.mixed_precision))
                lr = optimizer.param_groups[0]["lr"]  # the rate this step used
                optimizer.step()
                training.lr_scheduler.step()
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
            if state.step == 1 or state.step == plan.steps or state.step % plan.log_every == 0:
                log(progress_line(state.step, plan.steps, total, lr, state.elapsed))
    return state


def prior_prompts(data: TrainingData, batch, generator: torch.Generator, rank: int,
                  contexts_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """For the base-model prior, which of this process's pairs are denoised again and under
    which prompts (indices into the prompt table): every row under its photo's class caption
    (not with `contexts_only`, when the rows are class images), then, for a photo with
    prior_prompts, the row once more under one of them, drawn for the global batch. Rows count
    from the first pair of the process's slice. Also the length the step's prompts are sliced
    to (the global batch's longest; None when they keep their full length)."""
    draws = torch.rand(len(batch.instance), generator=generator)
    own, context_rows, contexts = [], [], []
    for row, (i, u) in enumerate(zip(batch.instance.tolist(), draws.tolist())):
        choices = data.prior_index[i]  # its class caption first, then the prior_prompts
        own.append(int(choices[0]))
        if len(choices) > 1:
            context_rows.append(row)
            contexts.append(int(choices[1 + int(u * (len(choices) - 1))]))
    if contexts_only:
        own = []
    length = batch.length if batch.length is None or not own + contexts else max(
        batch.length, int(data.prompt_len[torch.tensor(own + contexts)].max()))
    n = batch.n_instance
    mine = [(row - rank * n, prompt) for row, prompt in zip(context_rows, contexts)
            if rank * n <= row < (rank + 1) * n]
    rows = ([] if contexts_only else list(range(n))) + [row for row, _ in mine]
    prompts = own[rank * n:(rank + 1) * n] + [prompt for _, prompt in mine]
    return torch.tensor(rows), torch.tensor(prompts), length


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
