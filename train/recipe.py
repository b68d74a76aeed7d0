"""The DreamBooth recipe, top to bottom: `run(config)` turns photos into a tarball of weights.

    intake -> checks and dataset summary -> load base model -> top up class images ->
    cache latents (and text embeddings) -> train (checkpoints, samples) -> samples ->
    export (diffusers folder, single file, LoRA) -> tarball

Every check of the user's input happens before the model loads. The work directory is removed
at the end, whether the run succeeded or not. The front doors (`python -m train`, predict.py)
only build a TrainConfig and call this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import checkpoint
from . import data as data_mod
from . import distributed
from .config import Concept, TrainConfig, concepts_of
from .errors import UserError
from .distributed import rank_and_size
from .export import save_images, save_pipeline, versions, write_json, write_tar
from .intake import Limits, outside_folders, prompt_words, read_images, require_images
from .metrics import check_feature_models
from . import families
from .models import check_model
from .quiet import quiet_libraries


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
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def phase(name):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    # 1. Intake and every check of user input, before any model loads.
    limits = Limits(max_files=config.max_archive_files, max_bytes=config.max_archive_mib << 20,
                    max_ratio=config.max_compression_ratio,
                    max_pixels=config.max_image_megapixels * 10**6)
    concepts = concepts_of(config)
    instance, inst_skipped, classes, cls_skipped, n_generate = [], [], [], [], []
    for k, concept in enumerate(concepts):
        words = prompt_words(concept.instance_prompt, concept.class_prompt)
        where = f"instance_data folder {concept.folder!r}" if concept.folder else "instance_data"
        found, skipped = read_images(config.instance_data, where, concept.instance_prompt,
                                     config.resolution, limits=limits,
                                     background=config.alpha_background, words=words,
                                     folder=concept.folder, concept=k,
                                     folder_captions=config.folder_captions)
        require_images(found, skipped, where)
        instance += found
        inst_skipped += skipped
        have = []
        if config.with_prior_preservation and concept.class_folder is not None:
            have, skipped = read_images(config.class_data, "class_data", concept.class_prompt,
                                        config.resolution, limit=concept.num_class_images,
                                        limits=limits, background=config.alpha_background,
                                        words=words, folder=concept.class_folder, concept=k)
            classes += have
            cls_skipped += skipped
        wanted = concept.num_class_images if config.with_prior_preservation else 0
        n_generate.append(wanted - len(have))
    if config.concepts:  # say what the concept folders left out, rather than drop it silently
        inst_skipped += outside_folders(config.instance_data, "instance_data",
                                        [c.folder for c in concepts], limits)
    if config.use_8bit_adam:
        _bitsandbytes_adamw()
    check_model(*config.model_source())  # a model that cannot load is refused here, in ms
    if config.evaluate:
        check_feature_models(config.eval_dino, config.eval_clip)
    key = resume_meta = None
    if config.resume or config.checkpointing_steps:
        key = checkpoint.data_key(instance + classes)
    if config.resume:
        resume_meta = checkpoint.read_meta(config.resume)
        checkpoint.check_resumable(resume_meta, config, key, world)
        n_generate = [0] * len(concepts)  # the checkpoint has them
    if config.checkpointing_steps:
        check_writable(str(checkpoint.default_dir(config) / "x"), config.work_dir)
    plan = make_plan(config, concepts, instance, world)
    for line in dataset_summary(config, concepts, instance, inst_skipped, classes, cls_skipped,
                                n_generate, plan):
        log(line)
    phase("intake")

    # A fresh folder of our own (inside work_dir when given): removing it can lose nothing else.
    # The other processes of a multi-process run write nothing: theirs is made only to unpack
    # a checkpoint tarball to resume from.
    if config.work_dir:
        Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    own = rank == 0 or (config.resume and Path(config.resume).is_file())
    work = Path(tempfile.mkdtemp(prefix="dreambooth-", dir=config.work_dir)) if own else None
    try:
        return _train_and_export(config, concepts, plan, instance, inst_skipped, classes,
                                 cls_skipped, n_generate, key, work, timings, phase, log)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
        distributed.finish()


def _train_and_export(config, concepts, plan, instance, inst_skipped, classes, cls_skipped,
                      n_generate, key, work, timings, phase, log):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from diffusers import DDPMScheduler
    quiet_libraries(config.verbose)  # again: diffusers' progress bars can be turned off only now

    from .intake import Example
    from .loop import Diverged, LoopState, train
    from .models import load_pipeline
    from .sampling import generate, sampler

    torch.manual_seed(config.seed)
    cuda = torch.cuda.is_available()
    precision = resolve_precision(config.mixed_precision, cuda)
    if cuda:  # TF32 for the fp32 matmuls mixed precision leaves (latent caching); none when
        # the user asked for full fp32. set_float32_matmul_precision, not fp32_precision: torch
        # refuses a mix of that new API with the allow_tf32 flags accelerate sets.
        torch.set_float32_matmul_precision("highest" if precision == "no" else "high")
    # SDXL conditions on the first text encoder's penultimate layer: its last layer gets no
    # gradient, which DDP (several processes) must be told to expect.
    family = families.get(check_model(*config.model_source()))
    unused = config.train_text_encoder and family.UNUSED_TEXT_PARAMETERS
    accelerator = Accelerator(mixed_precision=precision, cpu=not cuda,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=unused)])
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    mode = "fp32" if precision == "no" else f"{precision} mixed precision"
    model, model_config = config.model_source()
    log(f"model: loading {model} on {device} ({mode})")
    pipe = load_pipeline(model, device, model_config)
    resumed = checkpoint.materialize(config.resume, work) if config.resume else None
    phase("load_model")

    # 2. Top up class images with the base model itself (before any weight changes), or take
    # them from the checkpoint being resumed. On a GPU the pipeline runs under autocast: fp32
    # weights stay exact for training.
    def half():
        return (torch.autocast("cuda", dtype=weight_dtype) if precision != "no"
                else contextlib.nullcontext())

    # Several processes split the images; each image has its own seed, so they are the same
    # images whichever process draws them.
    main = accelerator.is_main_process
    generated = _checkpoint_class_images(resumed, concepts) if resumed else []
    for k, (concept, count) in enumerate(zip(concepts, n_generate)):
        if count <= 0:
            continue
        mine = distributed.share(accelerator.process_index, count, accelerator.num_processes)
        with half():
            made = generate(pipe, concept.class_prompt, len(mine),
                            batch_size=config.sample_batch_size,
                            steps=config.class_infer_steps, guidance=7.5, seed=config.seed + k,
                            resolution=config.resolution, first=mine.start, log=log,
                            scheduler=sampler(pipe, config.class_scheduler),
                            label="class images" if accelerator.num_processes == 1 else
                            f"class images (rank 0's share of {count})")
        made = distributed.all_gather(made)
        folder = f"generated/{k}" if len(concepts) > 1 else "generated"
        generated += [Example(f"{folder}/{i:04d}.png", concept.class_prompt, im.size, im,
                              concept=k) for i, im in enumerate(made)]
    classes += generated
    phase("class_images")

    # The evaluation's feature models, and the base model's own predictions for its denoising
    # proxies, taken now: the weights are about to change.
    features, probes = None, []
    if config.evaluate and main:
        from .evaluate import denoising_probe
        from .metrics import load_feature_models

        features = load_feature_models(config.eval_dino, config.eval_clip, device)
        for k, concept in enumerate(concepts):
            with half():
                probes.append(denoising_probe(
                    pipe, [ex.image for ex in instance if ex.concept == k],
                    concept.instance_prompt, concept.class_prompt,
                    resolution=config.resolution, seed=config.seed, held_out=False,
                    steps=config.save_infer_steps, guidance=config.save_guidance_scale,
                    log=log))
        phase("probe")

    # 3. Cache latents once; and text embeddings too when the text encoders stay frozen.
    # SDXL has two text encoders (and tokenizers); both train, or both stay frozen.
    text_names = families.text_names(pipe)
    tokenizers = families.tokenizers(pipe)
    unet, vae = pipe.unet, pipe.vae
    text_encoders = families.text_encoders(pipe)
    # The VAE stays fp32: it encodes each image once (cheap), SDXL's overflows in fp16, and
    # the exported VAE is then exactly the base model's, not a round trip through bf16.
    vae.requires_grad_(False)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False)
    data = data_mod.prepare(family, vae, text_encoders, tokenizers, instance, classes,
                            config.resolution, config.center_crop,
                            cache_embeddings=not config.train_text_encoder, seed=config.seed,
                            flip=config.flip_p > 0, aspect_buckets=config.aspect_buckets)
    phase("cache")

    # 4. Train: all UNet weights (and the text encoders'), or LoRA adapters on them.
    base_weights = _base_weights(pipe, text_names, config) if config.extract_lora else None
    unet_params, text_params = mark_trainable(unet, dict(zip(text_names, text_encoders)), config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for text_encoder in text_encoders:
                text_encoder.activation_checkpointing_enable()  # transformers 5 name
    params = unet_params + text_params
    optimizer = make_optimizer(config, plan, unet_params, text_params)
    lr_scheduler = _lr_scheduler(config, plan, optimizer)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if config.train_text_encoder:
        unet, *text_encoders, optimizer = accelerator.prepare(unet, *text_encoders, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    trainable = {f"{part}.{n}": p
                 for part, model in zip(["unet", *text_names], [unet, *text_encoders])
                 for n, p in accelerator.unwrap_model(model).named_parameters()
                 if p.requires_grad}
    ema_names = [n for n in trainable if n.startswith("unet.")]
    ema = ({n: trainable[n].detach().float().clone() for n in ema_names}
           if config.use_ema else None)
    out = work / "output" if main else None
    if main:
        (out / "samples").mkdir(parents=True)
    if resumed:
        state = checkpoint.restore(resumed, trainable=trainable, optimizer=optimizer,
                                   lr_scheduler=lr_scheduler, scaler=accelerator.scaler, ema=ema)
        if main and (resumed / "samples").is_dir():
            shutil.copytree(resumed / "samples", out / "samples", dirs_exist_ok=True)
        log(f"resume: {resumed} (step {state.step}, {len(generated)} class images from it)")
    else:
        state = LoopState.start(config.seed)
    # Every process holds the same state after each step: rank 0 saves it.
    ckpt_root = checkpoint.default_dir(config) if config.checkpointing_steps and main else None
    # Encoded once: every checkpoint stores the generated class images.
    class_pngs = ({f"class_images/{ex.file}": _png(ex.image) for ex in generated}
                  if ckpt_root else {})
    # Each checkpoint's scores, so the final report can name the best balanced one; a resumed
    # run carries on the list its checkpoint holds.
    scored = (json.loads((resumed / "evaluations.json").read_text())
              if resumed and (resumed / "evaluations.json").is_file() else [])
    log(f"training: {plan['steps']} steps" + (f", from step {state.step}" if state.step else ""))
    every = [n for n in (config.checkpointing_steps, config.sample_every) if n]
    try:
        while state.step < plan["steps"]:
            until = min([plan["steps"]] + [(state.step // n + 1) * n for n in every])
            state = train(accelerator=accelerator, family=family, unet=unet, text_encoders=text_encoders,
                          noise_scheduler=noise_scheduler, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, data=data, params=params, state=state,
                          until=until, total_steps=plan["steps"], config=config,
                          prior_loss_weight=(config.prior_loss_weight if plan["class_images"]
                                             else 0.0),
                          log_every=plan["log_every"],
                          ema=list(ema.values()) if ema else None,
                          ema_params=[trainable[n] for n in ema_names], log=log)
            if main and config.sample_every and state.step % config.sample_every == 0 \
                    and state.step < plan["steps"]:
                with half():
                    _render_samples(pipe, config, out / "samples" / f"step-{state.step:06d}",
                                    log)
            if ckpt_root and state.step % config.checkpointing_steps == 0:
                files = class_pngs | {f"samples/{p.relative_to(out / 'samples')}":
                                      p.read_bytes() for p in (out / "samples").rglob("*.png")}
                # The last step's model is scored once, after training (with EMA, if on).
                if config.evaluate and state.step < plan["steps"]:
                    folder = work / "evaluation" / f"step-{state.step:06d}"
                    reports = _evaluate(pipe, config, concepts, instance, features, probes,
                                        folder, log)
                    scored.append({"step": state.step, "checkpoint": str(
                        ckpt_root / f"step-{state.step:06d}"), "reports": _brief(reports)})
                    files |= {f"evaluation/{p.relative_to(folder)}": p.read_bytes()
                              for p in folder.rglob("*") if p.is_file()}
                    shutil.rmtree(folder)
                if config.evaluate:
                    files["evaluations.json"] = json.dumps(scored).encode()
                saved = checkpoint.save(ckpt_root, state=state, trainable=trainable,
                                        optimizer=optimizer, lr_scheduler=lr_scheduler,
                                        scaler=accelerator.scaler, ema=ema, config=config,
                                        key=key, files=files,
                                        limit=config.checkpoints_total_limit,
                                        processes=accelerator.num_processes)
                log(f"checkpoint: {saved}")
    except Diverged as e:
        kept = checkpoint.complete(ckpt_root) if ckpt_root else []
        hint = (f"; the last good checkpoint is kept: resume from {kept[-1]} with a lower "
                f"learning rate" if kept else "")
        raise Diverged(f"{e}{hint}") from None
    pipe.unet = accelerator.unwrap_model(unet).eval()
    for name, text_encoder in zip(text_names, text_encoders):
        setattr(pipe, name, accelerator.unwrap_model(text_encoder).eval())
    if ema is not None:  # export the average, not the last step's weights
        with torch.no_grad():
            for name in ema_names:
                trainable[name].copy_(ema[name])
    history = state.history
    # DDP keeps the processes' weights identical; say so only after checking it.
    agreed = distributed.all_gather([_fingerprint(trainable)])
    if len(set(agreed)) > 1:
        raise RuntimeError(f"the {len(agreed)} training processes ended with different weights "
                           f"({agreed}): a bug, please report it")
    del optimizer, lr_scheduler, data, trainable, ema
    accelerator.free_memory()
    phase("train")
    if not main:  # rank 0 writes the outputs
        return Path(config.output)

    # 5. Samples, then the outputs and the tarball.
    samples = []
    if config.save_sample_prompt:
        with half():
            _render_samples(pipe, config, out / "samples", log)
        samples = sorted(str(p.relative_to(out)) for p in (out / "samples").rglob("*.png"))
    phase("samples")
    evaluation = None
    if config.evaluate:  # before the export, which casts the weights to save_precision
        with half():
            reports = _evaluate(pipe, config, concepts, instance, features, probes, out, log)
        final = {"step": plan["steps"], "reports": _brief(reports), "checkpoint": (
            str(ckpt_root / f"step-{plan['steps']:06d}") if ckpt_root
            and plan["steps"] % config.checkpointing_steps == 0 else None)}
        evaluation = _pick_checkpoint(scored + [final], out, len(concepts), log)
        del features, probes
        phase("evaluate")
    files = _export(pipe, config, out, base_weights)
    phase("export")
    record = {
        "config": config.to_dict(),
        "plan": plan,
        "device": str(device),
        "processes": {"count": accelerator.num_processes, "weights": agreed},
        "mixed_precision": precision,
        "versions": versions(),
        "timings": timings,
        "outputs": files,
        "dataset": {
            "instance": {"used": [ex.report() for ex in instance], "skipped": inst_skipped},
            "class": {"used": [ex.report() for ex in classes], "skipped": cls_skipped},
        },
        "samples": samples,
        "evaluation": evaluation,
        "history": history,
    }
    if not samples:
        (out / "samples").rmdir()
    write_json(out / "training.json", record)
    size = write_tar(out, Path(config.output))
    phase("tar")
    log(f"done: wrote {config.output} ({size / 2**20:.1f} MiB) in "
        f"{sum(timings.values()):.1f}s")
    return Path(config.output)


def _fingerprint(trainable: dict) -> str:
    """A digest of the trained weights (each tensor's sum in float64, computed where it lives)
    that processes compare."""
    import hashlib

    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in trainable.values()]).cpu()
    return hashlib.sha256(sums.numpy().tobytes()).hexdigest()[:16]


def mark_trainable(unet, text_encoders: dict, config) -> tuple[list, list]:
    """Mark what trains and return (UNet parameters, text-encoder parameters) to optimize.
    `text_encoders` by pipeline attribute: text_encoder, and SDXL's text_encoder_2."""
    train_text = text_encoders if config.train_text_encoder else {}
    if config.use_lora:
        from .lora import add_lora

        unet_params = add_lora(unet, config.lora_rank, config.lora_alpha, "unet")
        text_params = [p for kind, model in train_text.items()
                       for p in add_lora(model, config.lora_rank, config.lora_alpha, kind)]
        return unet_params, text_params
    unet.requires_grad_(True)
    for model in train_text.values():
        model.requires_grad_(True)
    return list(unet.parameters()), [p for model in train_text.values() for p in model.parameters()]


def make_optimizer(config, plan, unet_params, text_params):
    """AdamW over the UNet's parameters, and the text encoder's at text_encoder_lr."""
    groups = [{"params": unet_params}]
    if text_params:
        groups.append({"params": text_params, "lr": plan["text_encoder_lr"]})
    adam = dict(lr=plan["learning_rate"], betas=(config.adam_beta1, config.adam_beta2),
                weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.use_8bit_adam:
        return _bitsandbytes_adamw()(groups, **adam)
    # fused: one kernel for all tensors, 4x faster than the per-tensor loop on a CPU
    return torch.optim.AdamW(groups, fused=True, **adam)


def _lr_scheduler(config, plan, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(plan["lr_scheduler"], optimizer,
                         num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=plan["steps"],
                         num_cycles=config.lr_num_cycles, power=config.lr_power)


def _base_weights(pipe, text_names: list[str], config) -> dict:
    """CPU copies of the weights before training, for extract_lora, by pipeline attribute."""
    parts = ["unet"] + (text_names if config.train_text_encoder else [])
    return {name: {k: v.detach().to("cpu", torch.float32, copy=True)
                   for k, v in getattr(pipe, name).state_dict().items()} for name in parts}


def _render_samples(pipe, config, folder: Path, log) -> list[str]:
    from .sampling import generate

    images = generate(pipe, config.save_sample_prompt, config.n_save_sample,
                      batch_size=config.sample_batch_size, steps=config.save_infer_steps,
                      guidance=config.save_guidance_scale, seed=config.seed,
                      resolution=config.resolution,
                      negative_prompt=config.save_sample_negative_prompt, label="samples",
                      log=log)
    return save_images(images, folder, "sample")


def _evaluate(pipe, config, concepts, instance, features, probes, folder: Path, log) -> list:
    """Score the model as it is now, one report per concept, written into `folder` (or
    folder/evaluation/k with several concepts). Leaves the UNet and text encoders in eval mode:
    the next training segment puts them back in train mode."""
    from .evaluate import evaluate

    pipe.unet.eval()
    reports = []
    for k, concept in enumerate(concepts):
        where = folder if len(concepts) == 1 else folder / "evaluation" / str(k)
        reports.append(evaluate(
            pipe, [ex.image for ex in instance if ex.concept == k], concept.instance_prompt,
            concept.class_prompt, features, where, prompts=config.eval_prompt_list(),
            n_per_prompt=config.eval_images_per_prompt, steps=config.save_infer_steps,
            guidance=config.save_guidance_scale, seed=config.seed,
            resolution=config.resolution, batch_size=config.sample_batch_size,
            probe=probes[k], log=log))
    return reports


def _brief(reports: list[dict]) -> list[dict]:
    """What training.json and the checkpoint list keep of each concept's report."""
    return [{"metrics": r["metrics"], "proxies": r["proxies"]} for r in reports]


def _pick_checkpoint(candidates: list[dict], out: Path, n_concepts: int, log) -> dict:
    """Name the checkpoint (or the final model: the last candidate) that balances subject and
    prompt fidelity best, in each concept's evaluation.json; returns what training.json
    records of it."""
    from .evaluate import pick_balanced

    balanced = []
    for k in range(n_concepts):
        best = candidates[pick_balanced([c["reports"][k] for c in candidates])]
        balanced.append({"step": best["step"], "checkpoint": best["checkpoint"]})
        path = out / "evaluation.json" if n_concepts == 1 else (
            out / "evaluation" / str(k) / "evaluation.json")
        report = json.loads(path.read_text())
        report["checkpoints"] = [{"step": c["step"], "checkpoint": c["checkpoint"],
                                  **c["reports"][k]} for c in candidates]
        report["balanced"] = balanced[-1]
        path.write_text(json.dumps(report, indent=2) + "\n")
        if len(candidates) > 1:
            where = "the final model" if best is candidates[-1] else best["checkpoint"]
            log(f"evaluation: the best balance of subject and prompt fidelity is at step "
                f"{best['step']} ({where})")
    return {"checkpoints": candidates, "balanced": balanced}


def _export(pipe, config, out: Path, base_weights) -> list[str]:
    """Write the chosen formats into `out`; returns the files and folders written."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16,
             "fp32": torch.float32}[config.save_precision]
    formats = config.formats()
    written = []
    if "lora" in formats:
        from . import lora

        if config.use_lora:
            written += [str(p.relative_to(out)) for p in lora.save_lora(pipe, out, dtype).values()]
        else:  # kohya layout only: AUTOMATIC1111, ComfyUI and diffusers' load_lora_weights read it
            rank = config.extract_lora
            extracted = {}
            for kind, weights in base_weights.items():
                # A full fine-tune moves the resnets too: extract them as well (kohya's LoCon).
                targets = (lora.UNET_TARGETS + lora.UNET_RESNET_TARGETS if kind == "unet"
                           else None)
                extracted |= lora.extract_lora(weights, getattr(pipe, kind), rank, kind,
                                               targets=targets, sdxl=families.of(pipe) == "sdxl")
            lora.save_kohya(extracted, out / "lora.safetensors", dtype, lora.kohya_version(pipe),
                            rank, rank, v_prediction=pipe.scheduler.config.get(
                                "prediction_type") == "v_prediction")
            written.append("lora.safetensors")
    if config.use_lora and {"diffusers", "single_file"} & set(formats):
        from .lora import merge_lora

        merge_lora(pipe)  # full weights with the adapters folded in
    if "single_file" in formats:
        from .single_file import save_single_file

        save_single_file(pipe, out / "model.safetensors", dtype)
        written.append("model.safetensors")
    if "diffusers" in formats:
        save_pipeline(pipe, out, dtype)
        written.append("model_index.json")
    return written


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _checkpoint_class_images(folder: Path, concepts: list[Concept]) -> list:
    """The class images a checkpoint stored, as Examples in their original order."""
    from PIL import Image

    from .intake import Example

    root = folder / "class_images"
    examples = []
    for path in sorted(root.rglob("*.png")) if root.is_dir() else []:
        name = str(path.relative_to(root))
        with Image.open(path) as image:
            image = image.convert("RGB")
        concept = int(name.split("/")[1]) if name.count("/") == 2 else 0  # generated/k/i.png
        examples.append(Example(name, concepts[concept].class_prompt, image.size, image,
                                concept=concept))
    return examples


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


def make_plan(config: TrainConfig, concepts: list[Concept], instance: list,
              processes: int = 1) -> dict:
    """Resolve training length and learning rate. `max_train_steps` wins when it is set;
    0 means train for `num_train_epochs` epochs. An epoch pairs each concept's instance images
    with its class images: max(instances, class images) pairs per concept. Each optimizer step
    takes train_batch_size pairs in each of `processes` processes, gradient_accumulation_steps
    times: that product is the effective batch (and scale_lr's factor)."""
    prior = config.with_prior_preservation
    counts = [(sum(ex.concept == k for ex in instance), c.num_class_images if prior else 0)
              for k, c in enumerate(concepts)]
    pairs = sum(max(n_inst, n_cls) for n_inst, n_cls in counts)
    per_epoch = data_mod.steps_per_epoch(pairs, config.train_batch_size * processes,
                                         config.gradient_accumulation_steps)
    steps = config.max_train_steps or config.num_train_epochs * per_epoch
    scale = config.train_batch_size * config.gradient_accumulation_steps * processes
    return {
        "processes": processes,
        "effective_batch": scale,
        "steps": steps,
        "steps_per_epoch": per_epoch,
        "epochs": round(steps / per_epoch, 3),
        "instance_images": len(instance),
        "class_images": sum(n_cls for _, n_cls in counts),
        "concepts": [dataclasses.asdict(c) for c in concepts],
        "learning_rate": config.base_lr() * (scale if config.scale_lr else 1),
        "text_encoder_lr": (config.base_lr() if config.text_encoder_lr is None
                            else config.text_encoder_lr) * (scale if config.scale_lr else 1),
        # diffusers' "constant" ignores warm-up; lr_warmup_steps should do what it says.
        "lr_scheduler": ("constant_with_warmup" if config.lr_scheduler == "constant"
                         and config.lr_warmup_steps else config.lr_scheduler),
        "log_every": config.log_every or max(1, math.ceil(steps / 50)),
    }


def dataset_summary(config, concepts, instance, inst_skipped, classes, cls_skipped,
                    n_generate, plan):
    """Lines that tell a person what is about to be trained on, before anything slow starts."""
    lines = [f"dataset: {len(instance)} instance images, {len(inst_skipped)} files skipped"
             + (f", {len(concepts)} concepts" if len(concepts) > 1 else "")]
    for ex in instance:
        notes = "".join(f"  [{note}]" for note in ex.notes)
        lines.append(f"  use   {ex.file}  {ex.size[0]}x{ex.size[1]}  \"{ex.caption}\"{notes}")
    for s in inst_skipped:
        lines.append(f"  skip  {s['file']}  ({s['reason']})")
    for k, concept in enumerate(concepts):
        if not config.with_prior_preservation:
            lines.append("class images: none (prior preservation off)")
            break
        have = sum(ex.concept == k for ex in classes)
        lines.append(f"class images: {concept.num_class_images} \"{concept.class_prompt}\" "
                     f"({have} from class_data, {n_generate[k]} to generate)")
    for s in cls_skipped:
        lines.append(f"  skip  {s['file']}  ({s['reason']})")
    by = ("max_train_steps" if config.max_train_steps
          else f"num_train_epochs={config.num_train_epochs}")
    lines.append(f"plan: {plan['steps']} steps ({plan['epochs']} epochs of "
                 f"{plan['steps_per_epoch']} steps, set by {by}), batch "
                 f"{config.train_batch_size} x {config.gradient_accumulation_steps} accumulation"
                 + (f" x {plan['processes']} processes" if plan["processes"] > 1 else "")
                 + f", "
                 f"lr {plan['learning_rate']:.1e} {plan['lr_scheduler']}, text encoder "
                 f"{'trained' if config.train_text_encoder else 'frozen'}")
    for concept in concepts:
        noun = prompt_words(concept.instance_prompt, concept.class_prompt)[1]
        if concept.class_prompt and noun.lower() not in concept.instance_prompt.lower().split():
            lines.append(f"warning: instance_prompt \"{concept.instance_prompt}\" does not name "
                         f"the class \"{noun}\"; a prompt such as \"a photo of sks {noun}\" "
                         f"ties the identifier to the class, and usually learns faster and "
                         f"drifts less")
    if config.max_train_steps and config.num_train_epochs != 1:
        lines.append(f"warning: num_train_epochs={config.num_train_epochs} is overridden by "
                     f"max_train_steps={config.max_train_steps}; set max_train_steps to 0 to "
                     f"train by epochs")
    return lines


def resolve_precision(choice: str, cuda: bool) -> str:
    """The mixed precision to use: always fp32 ("no") on CPU; "auto" is bf16 where the GPU
    supports it, else fp16."""
    if not cuda:
        return "no"
    if choice == "auto":
        # Not emulated bf16: on pre-Ampere cards (T4, V100) it is far slower than fp16.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return choice


def _bitsandbytes_adamw():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("use_8bit_adam needs bitsandbytes, which is not installed: "
                        "pip install bitsandbytes, or set use_8bit_adam to false") from None
    return bitsandbytes.optim.AdamW8bit
