"""The DreamBooth recipe, top to bottom: `run(config)` turns photos into a tarball of weights.

    intake -> plan and dataset summary -> load the base model -> top up class images ->
    (evaluation baseline) -> cache latents (and text embeddings) -> prepare training ->
    train, with checkpoints -> samples, evaluation, export, training.json -> tarball

Each phase is a function below, in that order, taking what it needs and returning what the next
ones use. Every check of the user's input happens in `take_in`, before the model loads. The work
folder is removed at the end, whether the run succeeded or not. The front doors (`python -m
train`, predict.py) only build a TrainConfig and call `run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from . import checkpoint, distributed, families, sharding
from .card import base_model_id, file_uses, model_card
from .cleanup import remove, remove_leftovers
from .config import Concept, TrainConfig, concepts_of
from .data import TrainingData, prepare
from .distributed import rank_and_size
from .errors import UserError, out_of_disk
from .evaluate import brief, denoising_probe, evaluate_concepts, pick_checkpoint
from .export import export_formats, save_images, versions, write_json, write_tar
from .intake import Example, Limits, outside_folders, prompt_words, read_images, require_images
from .loop import Diverged, LoopState, Training, train
from .metrics import check_feature_models, load_feature_models
from .models import check_model, load_pipeline
from .optim import (base_weights, bitsandbytes_adamw, lr_schedule, make_optimizer,
                    mark_trainable)
from .plan import Plan, dataset_summary, make_plan
from .prior import (class_image_prior_prompts, class_image_prompts, frozen_copy,
                    instance_prior_prompts)
from .quantize import quantize_blocks
from .quiet import quiet_libraries
from .sampling import generate, sampler


def run(config: TrainConfig, log=print) -> Path:
    """Train DreamBooth as `config` says; returns the path of the output tarball. In a
    multi-process run (torchrun; train/distributed.py) only rank 0 logs and writes it."""
    quiet_libraries(config.verbose)
    rank, world = rank_and_size()
    if rank:
        log = _silent
    if not config.output:
        raise UserError("output is required: the path of the tarball to write, e.g. model.tar")
    check_writable(config.output, config.work_dir)
    timings = Timings()

    # A model that cannot load is refused here, in ms; its family gives what was left unset.
    kind = check_model(*config.model_source())
    config, taken = families.settle(config, kind)
    intake = take_in(config, world, kind)
    plan = make_plan(config, intake.concepts, intake.instance, world)
    for line in dataset_summary(config, intake, plan):
        log(line)
    if taken:
        log(f"{families.FAMILY_NAMES[kind]} defaults for what was not set: "
            + ", ".join(f"{name} {value:g}" for name, value in taken.items()))
    timings.end("intake")

    # A fresh folder of our own (inside work_dir when given): removing it can lose nothing else.
    # The other processes of a multi-process run write nothing: theirs is made only to unpack
    # a checkpoint tarball to resume from.
    if config.work_dir:
        Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    if rank == 0:  # what runs killed outright left here (SIGKILL gives them no chance)
        for name in remove_leftovers(config.work_dir or tempfile.gettempdir()):
            log(f"removed {name}, left by a run that was killed")
    own = rank == 0 or (config.resume and Path(config.resume).is_file())
    work = Path(tempfile.mkdtemp(prefix=f"dreambooth-{os.getpid()}-", dir=config.work_dir)) \
        if own else None
    try:
        model = load(config, work, log)
        timings.end("load_model")
        generated = top_up_class_images(config, intake, model, log)
        timings.end("class_images")
        baseline = evaluation_baseline(config, intake, model, log)
        if baseline:
            timings.end("probe")
        data = cache(config, intake, model)
        timings.end("cache")
        training = prepare_training(config, plan, model, log)
        out = work / "output" if model.main else None
        state, scored = train_with_checkpoints(config, plan, intake, model, data, training,
                                               generated, baseline, work, out, log)
        del data  # the cached latents: free before the export needs the memory
        agreed = finish_training(model, training)
        timings.end("train")
        if not model.main:  # rank 0 writes the outputs
            return Path(config.output)
        return write_outputs(config, plan, intake, model, training, state, scored, baseline,
                             agreed, out, timings, log)
    except Exception as e:
        if out_of_disk(e):
            raise UserError(f"ran out of disk space ({e}); no tarball was written: free some "
                            f"space, or give work_dir and output on a larger disk") from None
        raise
    finally:
        if work:
            remove(work)  # even when a second interruption arrives meanwhile
        distributed.finish()


@dataclass
class Intake:
    """What the user sent, read and checked: the images to train on and the class images to
    generate, per concept."""
    concepts: list[Concept]
    instance: list[Example]
    instance_skipped: list[dict]
    classes: list[Example]       # from class_data; the generated ones are added after loading
    class_skipped: list[dict]
    to_generate: list[int]       # class images to generate, per concept
    data_key: str | None         # identifies the images in checkpoints (None: no checkpoints)


def take_in(config: TrainConfig, world: int, kind: str) -> Intake:
    """Read every archive and check every input the run depends on, before any model loads:
    a user who sent a bad ZIP learns it in a second. `kind` is the base model's family."""
    limits = Limits(max_files=config.max_archive_files, max_bytes=config.max_archive_mib << 20,
                    max_ratio=config.max_compression_ratio,
                    max_pixels=config.max_image_megapixels * 10**6)
    concepts = concepts_of(config)
    intake = Intake(concepts, [], [], [], [], [], None)
    for k, concept in enumerate(concepts):
        words = prompt_words(concept.instance_prompt, concept.class_prompt)
        where = f"instance_data folder {concept.folder!r}" if concept.folder else "instance_data"
        found, skipped = read_images(config.instance_data, where, concept.instance_prompt,
                                     config.resolution, limits=limits,
                                     background=config.alpha_background, words=words,
                                     folder=concept.folder, concept=k,
                                     folder_captions=config.folder_captions)
        require_images(found, skipped, where)
        intake.instance += found
        intake.instance_skipped += skipped
        have = []
        if config.class_images() and concept.class_folder is not None:
            have, skipped = read_images(config.class_data, "class_data", concept.class_prompt,
                                        config.resolution, limit=concept.num_class_images,
                                        limits=limits, background=config.alpha_background,
                                        words=words, folder=concept.class_folder, concept=k)
            intake.classes += have
            intake.class_skipped += skipped
        wanted = concept.num_class_images if config.class_images() else 0
        intake.to_generate.append(wanted - len(have))
    if config.concepts:  # say what the concept folders left out, rather than drop it silently
        intake.instance_skipped += outside_folders(config.instance_data, "instance_data",
                                                   [c.folder for c in concepts], limits)
    if config.use_8bit_adam:
        bitsandbytes_adamw()
    families.check_settings(config, kind)  # what the model's family cannot take
    if config.evaluate:
        check_feature_models(config.eval_dino, config.eval_clip)
    if config.resume or config.checkpointing_steps:
        intake.data_key = checkpoint.data_key(intake.instance + intake.classes)
    if config.resume:
        meta = checkpoint.read_meta(config.resume, config)
        checkpoint.check_resumable(meta, config, intake.data_key, world)
        intake.to_generate = [0] * len(concepts)  # the checkpoint has them
    if config.checkpointing_steps:
        check_writable(str(checkpoint.default_dir(config) / "x"), config.work_dir)
    return intake


@dataclass
class Model:
    """The base model loaded for training, where it runs, and the checkpoint it resumes."""
    pipe: object
    family: ModuleType           # its module of train/families
    accelerator: object
    precision: str               # mixed precision: "no", "fp16" or "bf16"
    resumed: Path | None         # the unpacked checkpoint to resume from

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def dtype(self) -> torch.dtype:
        """The mixed precision's dtype (float32 without one)."""
        return precision_dtype(self.precision)

    def half(self):
        """Autocast to the mixed precision, for sampling on a GPU: the fp32 weights stay exact
        for training."""
        return (torch.autocast("cuda", dtype=self.dtype) if self.precision != "no"
                else contextlib.nullcontext())


def load(config: TrainConfig, work: Path | None, log) -> Model:
    """Seed, choose the precision, start accelerate and load the base model: in fp32, but for a
    LoRA in the mixed precision (its base never changes; the adapters train in fp32)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    quiet_libraries(config.verbose, loading=True)  # diffusers' loading bars, before it loads
    torch.manual_seed(config.seed)
    cuda = torch.cuda.is_available()
    precision = resolve_precision(config.mixed_precision, cuda)
    if config.fsdp and precision == "fp16":  # "auto" on a GPU without bf16
        raise UserError("fsdp trains in bf16 or fp32, and this GPU has no bf16: set "
                        "mixed_precision to no, or fsdp to false")
    if cuda:  # TF32 for the fp32 matmuls mixed precision leaves (latent caching); none when
        # the user asked for full fp32. set_float32_matmul_precision, not fp32_precision: torch
        # refuses a mix of that new API with the allow_tf32 flags accelerate sets.
        torch.set_float32_matmul_precision("highest" if precision == "no" else "high")
    family = families.get(check_model(*config.model_source()))
    # e.g. SDXL reads its first text encoder's penultimate layer: the last one gets no gradient,
    # which DDP (several processes) must be told to expect.
    unused = config.train_text_encoder and family.UNUSED_TEXT_PARAMETERS
    accelerator = Accelerator(mixed_precision=precision, cpu=not cuda,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=unused)])
    mode = "fp32" if precision == "no" else f"{precision} mixed precision"
    source, model_config, what = config.model_source()
    # A frozen base in half precision halves its memory: FLUX.1's transformer is 22 GiB in bf16.
    half = config.use_lora and precision != "no"
    log(f"model: loading {source} on {accelerator.device} ({mode}"
        + (f", the frozen base in {precision})" if half else ")"))
    dtype = precision_dtype(precision)
    pipe = load_pipeline(source, accelerator.device, model_config, what,
                         dtype=dtype if half else torch.float32)
    if config.quantize_base != "no":  # before the class images: they are drawn by this model
        count = quantize_blocks(families.denoiser(pipe), dtype)
        log(f"model: {count} layers of the {family.DENOISER}'s blocks held in 4 bits (nf4)")
    resumed = checkpoint.materialize(config.resume, work, config) if config.resume else None
    return Model(pipe, family, accelerator, precision, resumed)


def top_up_class_images(config: TrainConfig, intake: Intake, model: Model, log) -> list[Example]:
    """Generate the class images class_data did not bring, with the base model itself (before
    any weight changes), or take them from the checkpoint being resumed. They join
    intake.classes; returns the generated ones (checkpoints store them)."""
    accelerator = model.accelerator
    generated = (checkpoint.stored_class_images(model.resumed, intake.concepts)
                 if model.resumed else [])
    # Several processes split the images; each image has its own seed, so they are the same
    # images whichever process draws them.
    for k, (concept, count) in enumerate(zip(intake.concepts, intake.to_generate)):
        if count <= 0:
            continue
        mine = distributed.share(accelerator.process_index, count, accelerator.num_processes)
        prompts = class_image_prompts(concept, count, contexts=not config.base_model_prior())
        with model.half():
            made = generate(model.pipe, prompts[mine.start:mine.stop], len(mine),
                            batch_size=config.sample_batch_size,
                            steps=config.class_infer_steps, guidance=config.class_guidance_scale,
                            seed=config.seed + k, resolution=config.resolution,
                            first=mine.start, log=log,
                            scheduler=sampler(model.pipe, config.class_scheduler),
                            label="class images" if accelerator.num_processes == 1 else
                            f"class images (rank 0's share of {count})")
        made = distributed.all_gather(made)
        folder = f"generated/{k}" if len(intake.concepts) > 1 else "generated"
        generated += [Example(f"{folder}/{i:04d}.png", prompts[i], im.size, im, concept=k)
                      for i, im in enumerate(made)]
    intake.classes += generated
    return generated


@dataclass
class Baseline:
    """For evaluate: the feature models, and the base model's own predictions for the
    denoising proxies, taken before the weights change."""
    features: object
    probes: list


def evaluation_baseline(config: TrainConfig, intake: Intake, model: Model,
                        log) -> Baseline | None:
    if not (config.evaluate and model.main):
        return None

    features = load_feature_models(config.eval_dino, config.eval_clip, model.accelerator.device)
    probes = []
    for k, concept in enumerate(intake.concepts):
        with model.half():
            probes.append(denoising_probe(
                model.pipe, [ex.image for ex in intake.instance if ex.concept == k],
                concept.instance_prompt, concept.class_prompt,
                resolution=config.resolution, seed=config.seed, held_out=False,
                steps=config.save_infer_steps, guidance=config.save_guidance_scale, log=log))
    return Baseline(features, probes)


def cache(config: TrainConfig, intake: Intake, model: Model) -> TrainingData:
    """Encode every image once; and the prompts too when the text encoders stay frozen (SDXL's
    two text encoders both train, or both stay frozen)."""
    pipe = model.pipe
    text_encoders = families.text_encoders(pipe)
    # The VAE stays fp32: it encodes each image once (cheap), SDXL's overflows in fp16, and
    # the exported VAE is then exactly the base model's, not a round trip through bf16.
    pipe.vae.requires_grad_(False)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False)
    return prepare(model.family, pipe.vae, text_encoders, families.tokenizers(pipe),
                   intake.instance, intake.classes, config.resolution, config.center_crop,
                   cache_embeddings=not config.train_text_encoder, seed=config.seed,
                   flip=config.flip_p > 0, aspect_buckets=config.aspect_buckets,
                   prior=prior_prompt_lists(config, intake))


def prior_prompt_lists(config: TrainConfig, intake: Intake) -> list[list[str]] | None:
    """Per instance image, the prompts the base-model prior denoises its pair's rows under:
    its own class prompt first, then the contexts drawn from (train/prior.py). None when the
    base model gives no targets."""
    if not config.base_model_prior():
        return None
    if config.class_images():  # class_images+base_model: the rows are the pair's class image
        return [class_image_prior_prompts(intake.concepts[ex.concept]) for ex in intake.instance]
    return [instance_prior_prompts(intake.concepts[ex.concept], ex.caption)
            for ex in intake.instance]


def prepare_training(config: TrainConfig, plan: Plan, model: Model, log) -> Training:
    """Mark what trains (every weight, or LoRA adapters), shard it with fsdp, build the
    optimizer and schedules, and hand the models to accelerate."""
    pipe, accelerator, family = model.pipe, model.accelerator, model.family
    text_names = families.text_names(pipe)
    name, denoiser = family.DENOISER, families.denoiser(pipe)
    text_encoders = families.text_encoders(pipe)
    # The text encoders that may train (not T5: FROZEN_TEXT), by pipeline attribute.
    trained = {n: e for n, e in zip(text_names, text_encoders) if n not in family.FROZEN_TEXT}
    before = (base_weights(pipe, [name, *trained], config) if config.extract_lora
              else None)
    # A full fine-tune's base-model prior needs the denoiser as it was; a LoRA's is the same
    # network with its adapters off.
    base_denoiser = (frozen_copy(denoiser, model.dtype) if config.base_model_prior()
                     and not config.use_lora else None)
    unet_params, text_params = mark_trainable(denoiser, name, trained, config)
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for text_encoder in trained.values():
                text_encoder.activation_checkpointing_enable()  # transformers 5 name
    shards = {}
    if config.fsdp and accelerator.num_processes > 1:
        # Sharded before the optimizer is built: FSDP replaces the parameters.
        parts = {name: denoiser} | (trained if config.train_text_encoder else {})
        classes = sharding.shard(list(parts.values()), accelerator.device,
                                 model.dtype if model.precision == "bf16" else None)
        shards = dict(zip(parts, classes))
        unet_params = [p for p in denoiser.parameters() if p.requires_grad]
        text_params = [p for part, module in parts.items() if part != name
                       for p in module.parameters() if p.requires_grad]
        held = sum(p.to_local().numel() for p in unet_params + text_params)
        total = sum(p.numel() for p in unet_params + text_params)
        log(f"fsdp: the {', '.join(parts)} sharded across {accelerator.num_processes} "
            f"processes: {held:,} of the {total:,} trained parameters in each")
    optimizer = make_optimizer(config, unet_params, text_params, plan.learning_rate,
                               plan.text_encoder_lr)
    lr_scheduler = lr_schedule(config, plan.lr_scheduler, plan.steps, optimizer)
    noise_scheduler = family.training_scheduler(pipe.scheduler.config)
    if shards:  # accelerate takes the optimizer only: the models are FSDP's, not DDP's
        optimizer = accelerator.prepare(optimizer)
    elif config.train_text_encoder:
        denoiser, *prepared, optimizer = accelerator.prepare(denoiser, *trained.values(),
                                                             optimizer)
        trained = dict(zip(trained, prepared))
        text_encoders = [trained.get(n, e) for n, e in zip(text_names, text_encoders)]
    else:
        denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    trainable = {f"{part}.{n}": p
                 for part, module in zip([name, *text_names], [denoiser, *text_encoders])
                 for n, p in accelerator.unwrap_model(module).named_parameters()
                 if p.requires_grad}
    ema = ({n: p.detach().float().clone() for n, p in trainable.items()
            if n.startswith(name + ".")} if config.use_ema else None)
    return Training(denoiser, text_encoders, optimizer, lr_scheduler, noise_scheduler,
                    unet_params + text_params, trainable, ema, before, base_denoiser, name,
                    shards)


def train_with_checkpoints(config: TrainConfig, plan: Plan, intake: Intake, model: Model,
                           data: TrainingData, training: Training, generated: list[Example],
                           baseline: Baseline | None, work: Path, out: Path | None,
                           log) -> tuple[LoopState, list]:
    """Train to plan.steps in stretches between checkpoints and intermediate samples; returns
    the loop's final state and the checkpoints' evaluations (with evaluate)."""
    if out:
        (out / "samples").mkdir(parents=True)
    if model.resumed:
        state = checkpoint.restore(model.resumed, trainable=training.trainable,
                                   optimizer=training.optimizer,
                                   lr_scheduler=training.lr_scheduler,
                                   scaler=model.accelerator.scaler, ema=training.ema)
        if out and (model.resumed / "samples").is_dir():
            shutil.copytree(model.resumed / "samples", out / "samples", dirs_exist_ok=True)
        log(f"resume: {model.resumed} (step {state.step}, {len(generated)} class images from "
            f"it)")
    else:
        state = LoopState.start(config.seed)
    # Every process holds the same state after each step: rank 0 saves it.
    ckpt_root = checkpoint.default_dir(config) if config.checkpointing_steps and out else None
    # Encoded once: every checkpoint stores the generated class images.
    class_pngs = ({f"class_images/{ex.file}": checkpoint.png_bytes(ex.image) for ex in generated}
                  if ckpt_root else {})
    class_pngs |= {f"class_images/{ex.file.removesuffix('.png')}.txt": ex.caption.encode()
                   for ex in generated if ckpt_root
                   and ex.caption != intake.concepts[ex.concept].class_prompt}
    # Each checkpoint's scores, so the final report can name the best balanced one; a resumed
    # run carries on the list its checkpoint holds.
    evaluations = model.resumed / "evaluations.json" if model.resumed else None
    scored = (json.loads(evaluations.read_text())
              if evaluations and evaluations.is_file() else [])
    log(f"training: {plan.steps} steps" + (f", from step {state.step}" if state.step else ""))
    every = [n for n in (config.checkpointing_steps, config.sample_every) if n]
    try:
        while state.step < plan.steps:
            until = min([plan.steps] + [(state.step // n + 1) * n for n in every])
            with text_encoders_parked(model, frozen=data.prompt_emb is not None):
                state = train(model.accelerator, model.family, training, data, state, plan,
                              config, until, log)
            if out and config.sample_every and state.step % config.sample_every == 0 \
                    and state.step < plan.steps:
                with model.half():
                    render_samples(model.pipe, config, out / "samples" / f"step-{state.step:06d}",
                                   log)
            if config.checkpointing_steps and state.step % config.checkpointing_steps == 0:
                # Every process takes part: a sharded run's weights and moments are gathered.
                whole = ((sharding.full_tensors(training.trainable),
                          sharding.full_optimizer_state(training.optimizer))
                         if training.shards else
                         (training.trainable, training.optimizer.state_dict()))
                if ckpt_root:
                    save_checkpoint(config, plan, intake, model, training, state, scored,
                                    baseline, ckpt_root, class_pngs, work, out, whole, log)
    except Diverged as e:
        kept = checkpoint.complete(ckpt_root) if ckpt_root else []
        hint = (f"; the last good checkpoint is kept: resume from {kept[-1]} with a lower "
                f"learning rate" if kept else "")
        raise Diverged(f"{e}{hint}") from None
    return state, scored


@contextlib.contextmanager
def text_encoders_parked(model: Model, frozen: bool):
    """While the denoiser trains, frozen text encoders (their embeddings cached) wait in CPU
    memory on a GPU machine: SD 3.5's and FLUX's T5-XXL is 9 GiB in bf16. They come back for
    samples, evaluation and the export."""
    encoders = families.text_encoders(model.pipe)
    device = model.accelerator.device
    if not frozen or device.type != "cuda":
        yield
        return
    for encoder in encoders:
        encoder.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        for encoder in encoders:
            encoder.to(device)


def save_checkpoint(config, plan, intake, model, training, state, scored, baseline, ckpt_root,
                    class_pngs, work, out, whole, log) -> None:
    """Save the whole training state at this step (`whole`: the trainable weights and the
    optimizer's state, gathered if sharded), with the samples so far and, with evaluate, this
    step's scores (added to `scored`)."""
    files = class_pngs | {f"samples/{p.relative_to(out / 'samples')}": p.read_bytes()
                          for p in (out / "samples").rglob("*.png")}
    # The last step's model is scored once, after training (with EMA, if on).
    if config.evaluate and state.step < plan.steps:
        folder = work / "evaluation" / f"step-{state.step:06d}"
        reports = evaluate_concepts(model.pipe, config, intake.concepts, intake.instance,
                                    baseline.features, baseline.probes, folder, log)
        scored.append({"step": state.step, "checkpoint": str(
            ckpt_root / f"step-{state.step:06d}"), "reports": brief(reports)})
        files |= {f"evaluation/{p.relative_to(folder)}": p.read_bytes()
                  for p in folder.rglob("*") if p.is_file()}
        shutil.rmtree(folder)
    if config.evaluate:
        files["evaluations.json"] = json.dumps(scored).encode()
    saved = checkpoint.save(ckpt_root, state=state, trainable=whole[0],
                            optimizer_state=whole[1], lr_scheduler=training.lr_scheduler,
                            scaler=model.accelerator.scaler, ema=training.ema, config=config,
                            key=intake.data_key, files=files,
                            limit=config.checkpoints_total_limit,
                            processes=model.accelerator.num_processes)
    log(f"checkpoint: {saved}")


def finish_training(model: Model, training: Training) -> list[str]:
    """Put the trained models back into the pipeline (the EMA's weights with use_ema), check
    that every process ended with the same weights, and free the optimizer; returns each
    process's weight fingerprint."""
    pipe, accelerator = model.pipe, model.accelerator
    setattr(pipe, training.denoiser_name, accelerator.unwrap_model(training.denoiser).eval())
    for name, text_encoder in zip(families.text_names(pipe), training.text_encoders):
        setattr(pipe, name, accelerator.unwrap_model(text_encoder).eval())
    if training.ema is not None:  # export the average, not the last step's weights
        with torch.no_grad():
            for name in training.ema_names:
                training.trainable[name].copy_(training.ema[name])
    if training.shards:  # the full weights, gathered into plain models on rank 0
        plain = {part: sharding.unsharded(getattr(pipe, part), cls, accelerator.device)
                 for part, cls in training.shards.items()}
        agreed = []
        if model.main:
            for part, module in plain.items():
                setattr(pipe, part, module.eval())
            agreed = [distributed.fingerprint({f"{part}.{n}": p for part, module in plain.items()
                                               for n, p in module.named_parameters()})]
    else:  # DDP keeps the processes' weights identical; say so only after checking it.
        agreed = distributed.all_gather([distributed.fingerprint(training.trainable)])
    if len(set(agreed)) > 1:
        raise RuntimeError(f"the {len(agreed)} training processes ended with different weights "
                           f"({agreed}): a bug, please report it")
    training.optimizer = training.lr_scheduler = training.trainable = training.ema = None
    training.denoiser = training.text_encoders = training.base_denoiser = None
    accelerator.free_memory()
    return agreed


def write_outputs(config, plan, intake, model, training, state, scored, baseline, agreed, out,
                  timings, log) -> Path:
    """Samples, evaluation, the chosen formats and training.json, then the tarball."""
    pipe = model.pipe
    samples = []
    if config.save_sample_prompt:
        with model.half():
            render_samples(pipe, config, out / "samples", log)
        samples = sorted(str(p.relative_to(out)) for p in (out / "samples").rglob("*.png"))
    timings.end("samples")
    evaluation = None
    if config.evaluate:  # before the export, which casts the weights to save_precision

        with model.half():
            reports = evaluate_concepts(pipe, config, intake.concepts, intake.instance,
                                        baseline.features, baseline.probes, out, log)
        ckpt_root = checkpoint.default_dir(config) if config.checkpointing_steps else None
        final = {"step": plan.steps, "reports": brief(reports), "checkpoint": (
            str(ckpt_root / f"step-{plan.steps:06d}") if ckpt_root
            and plan.steps % config.checkpointing_steps == 0 else None)}
        evaluation = pick_checkpoint(scored + [final], out, len(intake.concepts), log)
        timings.end("evaluate")
    files = export_formats(pipe, config, out, training.base_weights)
    uses = file_uses(files)
    base = None if config.base_checkpoint else base_model_id(config.model)
    (out / "README.md").write_text(model_card(config, families.of(pipe), uses, samples, base))
    timings.end("export")
    record = {
        "config": config.to_dict(),
        # What the generator (train/trained.py) checks a LoRA's base model against.
        "family": families.of(pipe),
        "base_model": base,
        "plan": dataclasses.asdict(plan),
        "device": str(model.accelerator.device),
        "processes": {"count": model.accelerator.num_processes, "weights": agreed,
                      "sharded": sorted(training.shards)},
        "mixed_precision": model.precision,
        "versions": versions(),
        "timings": timings.seconds,
        "outputs": files,
        "files": uses,
        "dataset": {
            "instance": {"used": [ex.report() for ex in intake.instance],
                         "skipped": intake.instance_skipped},
            "class": {"used": [ex.report() for ex in intake.classes],
                      "skipped": intake.class_skipped},
        },
        "samples": samples,
        "evaluation": evaluation,
        "history": state.history,
    }
    if not samples:
        (out / "samples").rmdir()
    write_json(out / "training.json", record)
    size = write_tar(out, Path(config.output))
    timings.end("tar")
    log(f"done: wrote {config.output} ({size / 2**20:.1f} MiB) in "
        f"{sum(timings.seconds.values()):.1f}s")
    return Path(config.output)


def render_samples(pipe, config: TrainConfig, folder: Path, log) -> list[str]:
    images = generate(pipe, config.save_sample_prompt, config.n_save_sample,
                      batch_size=config.sample_batch_size, steps=config.save_infer_steps,
                      guidance=config.save_guidance_scale, seed=config.seed,
                      resolution=config.resolution,
                      negative_prompt=config.save_sample_negative_prompt, label="samples",
                      log=log)
    return save_images(images, folder, "sample")


@dataclass
class Timings:
    """Seconds each phase took, for training.json."""
    seconds: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)

    def end(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self.clock, 3)
        self.clock = now


def _silent(_line: str) -> None:
    """The log of every process but rank 0."""


def check_writable(output: str, work_dir: str | None) -> None:
    """Refuse an output or work folder that cannot be written, before hours of training."""
    out = Path(output)
    if out.is_dir():
        raise UserError(f"output {output} is a folder: give a file path, e.g. "
                        f"{out / 'model.tar'}")
    for folder, what in ((out.parent, "output"), (Path(work_dir or tempfile.gettempdir()),
                                                  "work_dir")):
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"{what}: cannot write in {folder} ({existing} is not a writable "
                            f"folder)")


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype of a mixed precision ("no": float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def resolve_precision(choice: str, cuda: bool) -> str:
    """The mixed precision to use: always fp32 ("no") on CPU; "auto" is bf16 where the GPU
    supports it, else fp16."""
    if not cuda:
        return "no"
    if choice == "auto":
        # Not emulated bf16: on pre-Ampere cards (T4, V100) it is far slower than fp16.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return choice
