"""Checkpoints: the whole training state every N steps, so that a killed run resumes exactly.

    python -m train ... --output dog.tar --checkpointing-steps 200   # dog-checkpoints/step-000200/
    python -m train ... --output dog.tar --resume dog-checkpoints     # from the latest one

A checkpoint folder holds everything the next step depends on:
  state.json              step, the batches the epoch has left, loss history, training time,
                          the settings and a key of the training images
  trainable.safetensors   the weights being trained, fp32 (UNet and text encoder, or LoRA adapters)
  ema.safetensors         the EMA weights (use_ema)
  optimizer.pt, scheduler.pt, generator.pt, scaler.pt (fp16 only)
  class_images/           the generated class images (PNG: lossless), not generated again
  samples/                the samples rendered so far (sample_every)
It is written as `step-N.partial` and renamed when complete, so a kill mid-write leaves the
previous checkpoint as the latest; `resume` also takes a tarball of a checkpoint folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .config import TrainConfig, effective_lr
from .errors import UserError
from .intake import Example, input_path, looks_like_tar
from .loop import LoopState

# Settings a resumed run may change: where things go, how often to save, what to render and
# export, and how long to train. Every other setting must match, or the run would not continue
# the same training.
MAY_CHANGE = {"output", "work_dir", "checkpoint_dir", "resume", "checkpointing_steps",
              "checkpoints_total_limit", "log_every", "save_sample_prompt",
              "save_sample_negative_prompt", "n_save_sample", "save_guidance_scale",
              "save_infer_steps", "sample_every", "sample_batch_size", "output_format",
              "save_precision", "extract_lora", "max_train_steps", "num_train_epochs",
              "instance_data", "class_data", "max_archive_files", "max_archive_mib",
              "max_compression_ratio", "max_image_megapixels", "evaluate", "eval_prompts",
              "eval_images_per_prompt", "eval_dino", "eval_clip"}


def default_dir(config: TrainConfig) -> Path:
    """`checkpoint_dir`, or `<output name>-checkpoints` next to the output."""
    if config.checkpoint_dir:
        return Path(config.checkpoint_dir)
    out = Path(config.output)
    return out.with_name(out.stem + "-checkpoints")


def data_key(examples) -> str:
    """A fingerprint of the training images and captions: a resume must see the same data."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.file}\0{ex.caption}\0{ex.concept}\0{ex.image.size}\0".encode())
        digest.update(ex.image.tobytes())
    return digest.hexdigest()[:16]


def save(root: Path, *, state: LoopState, trainable: dict, optimizer, lr_scheduler, scaler,
         ema: dict | None, config: TrainConfig, key: str, files: dict[str, bytes],
         limit: int, processes: int = 1) -> Path:
    """Write checkpoint `root/step-N` atomically and keep only the latest `limit` (0 = all).
    `files` are extra files by relative path (class images, samples)."""
    final = root / f"step-{state.step:06d}"
    partial = root / f"step-{state.step:06d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({name: p.detach().float().cpu().contiguous() for name, p in trainable.items()},
              partial / "trainable.safetensors")
    if ema is not None:
        save_file({name: t.cpu().contiguous() for name, t in ema.items()},
                  partial / "ema.safetensors")
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), partial / "scheduler.pt")
    torch.save(state.generator.get_state(), partial / "generator.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), partial / "scaler.pt")
    for name, payload in files.items():
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        (partial / name).write_bytes(payload)
    meta = {"step": state.step, "pending": state.pending, "history": state.history,
            "elapsed": state.elapsed, "data_key": key, "config": config.to_dict(),
            "processes": processes}
    (partial / "state.json").write_text(json.dumps(meta) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in complete(root)[:-limit] if limit else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob("step-*.partial"):  # from a run killed while saving
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def complete(root: Path) -> list[Path]:
    """The finished checkpoints under `root`, oldest first."""
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(
        ".partial") and (p / "state.json").is_file())


def read_meta(resume: str) -> dict:
    """state.json of the checkpoint `resume` names (a folder, a folder of checkpoints, or a
    tarball), read without extracting anything. Raises UserError when there is none."""
    path = input_path(resume, "resume", "a checkpoint folder or a tarball of one")
    if path.is_dir():
        return json.loads((find(path) / "state.json").read_text())
    if looks_like_tar(path):
        with tarfile.open(path) as tar:
            member = _state_member(tar, resume)
            return json.loads(tar.extractfile(member).read())
    raise UserError(f"resume: {resume} is neither a checkpoint folder nor a tarball of one")


def find(path: Path) -> Path:
    """The checkpoint folder `path` names: itself, or the latest complete one inside it."""
    if (path / "state.json").is_file():
        return path
    found = complete(path)
    if not found:
        raise UserError(f"resume: no checkpoint in {path} (a checkpoint folder holds "
                        f"state.json; runs write them with checkpointing_steps)")
    return found[-1]


def materialize(resume: str, work: Path) -> Path:
    """A checkpoint folder on disk: the one `resume` names, or its tarball extracted in work."""
    path = Path(resume)
    if path.is_dir():
        return find(path)
    with tarfile.open(path) as tar:
        member = _state_member(tar, resume)
        tar.extractall(work / "resume", filter="data")
    return (work / "resume" / member.name).parent


def _state_member(tar: tarfile.TarFile, resume: str) -> tarfile.TarInfo:
    members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name == "state.json"
               and len(Path(m.name).parts) <= 2]
    if len(members) != 1:
        raise UserError(f"resume: {resume} is not a tarball of one checkpoint folder (it holds "
                        f"{len(members)} state.json files)")
    return members[0]


def check_resumable(meta: dict, config: TrainConfig, key: str, processes: int = 1) -> None:
    """Refuse to resume with other settings, other images or another number of processes (the
    batches an epoch has left are split among them), naming what differs."""
    saved = dict(meta["config"])
    ours = config.to_dict()
    # An unset learning rate means the default for the method: compare the rates in effect.
    saved["learning_rate"] = effective_lr(saved.get("learning_rate"), saved.get("use_lora"))
    ours["learning_rate"] = config.base_lr()
    changed = [f"{name} {saved.get(name)!r} -> {value!r}" for name, value in ours.items()
               if name not in MAY_CHANGE and saved.get(name) != value]
    if changed:
        raise UserError(f"resume: the checkpoint was trained with other settings "
                        f"({'; '.join(changed[:5])}); resume with the same ones (only output, "
                        f"step counts, checkpoint, sample, evaluation and export settings may "
                        f"change)")
    saved_processes = meta.get("processes", 1)
    if saved_processes != processes:
        raise UserError(f"resume: the checkpoint was trained on {saved_processes} process(es), "
                        f"this run has {processes}; resume on {saved_processes}")
    if meta["data_key"] != key:
        raise UserError("resume: the training images differ from the checkpoint's; resume "
                        "with the same instance_data and class_data")


def restore(folder: Path, *, trainable: dict, optimizer, lr_scheduler, scaler,
            ema: dict | None) -> LoopState:
    """Load a checkpoint into the live objects; returns the loop state to continue from."""
    meta = json.loads((folder / "state.json").read_text())
    weights = load_file(folder / "trainable.safetensors")
    if set(weights) != set(trainable):
        raise UserError(f"resume: the checkpoint's weights do not fit this model "
                        f"({len(weights)} tensors saved, {len(trainable)} expected)")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
        if ema is not None:
            for name, t in load_file(folder / "ema.safetensors").items():
                ema[name].copy_(t)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if scaler is not None:
        scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    generator = torch.Generator()
    generator.set_state(torch.load(folder / "generator.pt", weights_only=True))
    return LoopState(meta["step"], generator, [tuple(b) for b in meta["pending"]],
                     meta["history"], meta["elapsed"])


def png_bytes(image) -> bytes:
    """An image as PNG bytes: how a checkpoint stores generated class images."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def stored_class_images(folder: Path, concepts: list) -> list:
    """The class images a checkpoint stored, as Examples in their original order."""
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
