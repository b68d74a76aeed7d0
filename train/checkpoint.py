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
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import sharding
from .cleanup import remove
from .config import TrainConfig
from .errors import UserError
from .intake import Example, Limits, input_path, looks_like_tar, member_problem, tar_members
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


def save(root: Path, *, state: LoopState, trainable: dict, optimizer_state: dict, lr_scheduler,
         scaler, ema: dict | None, config: TrainConfig, key: str, files: dict[str, bytes],
         limit: int, processes: int = 1) -> Path:
    """Write checkpoint `root/step-N` atomically and keep only the latest `limit` (0 = all).
    `trainable` and `optimizer_state` are whole (a sharded run gathers them first: sharding.py);
    `files` are extra files by relative path (class images, samples)."""
    final = root / f"step-{state.step:06d}"
    partial = root / f"step-{state.step:06d}.partial"
    remove(partial)  # from a run killed while saving
    try:
        partial.mkdir(parents=True)
        save_file({name: p.detach().float().cpu().contiguous() for name, p in trainable.items()},
                  partial / "trainable.safetensors")
        if ema is not None:
            save_file({name: t.cpu().contiguous() for name, t in ema.items()},
                      partial / "ema.safetensors")
        torch.save(optimizer_state, partial / "optimizer.pt")
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
    except BaseException:  # a full disk, Ctrl-C, a cancel: a finished checkpoint or none
        remove(partial)
        raise
    for old in complete(root)[:-limit] if limit else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob("step-*.partial"):  # from a run killed while saving
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def complete(root: Path) -> list[Path]:
    """The finished checkpoints under `root`, oldest first."""
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(
        ".partial") and (p / "state.json").is_file())


def read_meta(resume: str, config: TrainConfig) -> dict:
    """state.json of the checkpoint `resume` names (a folder, a folder of checkpoints, or a
    tarball), read without extracting anything. Raises UserError when there is none, and for a
    tarball that is damaged, a bomb, or holds anything but files inside one folder."""
    path = input_path(resume, "resume", "a checkpoint folder or a tarball of one")
    if path.is_dir():
        return _parse((find(path) / "state.json").read_bytes(), resume)
    if looks_like_tar(path):
        members = _tar_files(path, config)
        return _parse(members[_state_name(members, resume)][1]().read(), resume)
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


def materialize(resume: str, work: Path, config: TrainConfig) -> Path:
    """A checkpoint folder on disk: the one `resume` names, or its tarball unpacked in work
    (file by file, streamed: nothing but the files read_meta checked)."""
    path = Path(resume)
    if path.is_dir():
        return find(path)
    members = _tar_files(path, config)
    for name, (member, stream) in members.items():
        dest = work / "resume" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with stream() as source, open(dest, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
    return (work / "resume" / _state_name(members, resume)).parent


def _tar_files(path: Path, config: TrainConfig) -> dict:
    """name -> (TarInfo, stream) of a checkpoint tarball's files, read as the photo intake reads
    archives. A checkpoint this trainer wrote is a plain tar (it expands to its own size):
    compressed, it may expand max_compression_ratio times, and never past the free space
    where it would be unpacked."""
    where = Path(config.work_dir or tempfile.gettempdir())
    free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
    limits = Limits(max_files=config.max_archive_files, max_ratio=config.max_compression_ratio,
                    max_bytes=min(int(path.stat().st_size * config.max_compression_ratio), free),
                    advice="resume from a checkpoint tarball this trainer wrote")
    files = {}
    for member, stream in tar_members(path, "resume", limits):
        what = member_problem(member)
        if what:
            raise UserError(f"resume: {path.name} holds {what} ({member.name!r}); a checkpoint "
                            f"tarball holds one folder of files, as this trainer writes it")
        files[member.name] = (member, stream)
    return files


def _state_name(names, resume: str) -> str:
    found = [n for n in names if Path(n).name == "state.json" and len(Path(n).parts) <= 2]
    if len(found) != 1:
        raise UserError(f"resume: {resume} is not a tarball of one checkpoint folder (it holds "
                        f"{len(found)} state.json files)")
    return found[0]


def _parse(payload: bytes, resume: str) -> dict:
    try:
        meta = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"resume: the state.json of {resume} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "config" not in meta or "step" not in meta:
        raise UserError(f"resume: the state.json of {resume} is not one this trainer wrote")
    return meta


def check_resumable(meta: dict, config: TrainConfig, key: str, processes: int = 1) -> None:
    """Refuse to resume with other settings, other images or another number of processes (the
    batches an epoch has left are split among them), naming what differs."""
    saved = dict(meta["config"])
    ours = config.to_dict()
    # Earlier releases saved an unset learning rate as None: it meant 1e-6, or 1e-4 for a LoRA
    # (`config` is settled: families.settle gave it the family's defaults).
    if saved.get("learning_rate") is None:
        saved["learning_rate"] = 1e-4 if saved.get("use_lora") else 1e-6
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
    """Load a checkpoint into the live objects (sharded ones take their shard of each tensor);
    returns the loop state to continue from. A checkpoint that does not fit this model, or
    holds more than tensors (a pickled object, which torch.load(weights_only=True) refuses to
    run), is a UserError."""
    meta = json.loads((folder / "state.json").read_text())
    weights = _tensors(folder / "trainable.safetensors")
    wrong = [n for n, p in trainable.items() if n in weights and weights[n].shape != p.shape]
    if set(weights) != set(trainable) or wrong:
        raise UserError(f"resume: the checkpoint's weights do not fit this model "
                        f"({len(weights)} tensors saved, {len(trainable)} expected"
                        + (f"; {wrong[0]} is {tuple(weights[wrong[0]].shape)}, not "
                           f"{tuple(trainable[wrong[0]].shape)}" if wrong else "")
                        + "): resume with the base model it was made with")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(sharding.like(p, weights[name]))
        if ema is not None:
            for name, t in _tensors(folder / "ema.safetensors").items():
                ema[name].copy_(t)
    optimizer.load_state_dict(sharding.sharded_optimizer_state(optimizer,
                                                               _state(folder / "optimizer.pt")))
    lr_scheduler.load_state_dict(_state(folder / "scheduler.pt"))
    if scaler is not None:
        scaler.load_state_dict(_state(folder / "scaler.pt"))
    generator = torch.Generator()
    generator.set_state(_state(folder / "generator.pt"))
    return LoopState(meta["step"], generator, [tuple(b) for b in meta["pending"]],
                     meta["history"], meta["elapsed"])


def _tensors(path: Path) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"resume: the checkpoint's {path.name} is unreadable ({e})") from None


def _state(path: Path):
    """A state saved with torch.save: tensors, numbers and containers only (weights_only)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"resume: the checkpoint's {path.name} holds objects, not only tensors; "
                        f"it was not written by this trainer and is not loaded (unpickling can "
                        f"run code)") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise UserError(f"resume: the checkpoint's {path.name} is unreadable ({e})") from None


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
        caption = path.with_suffix(".txt")  # beside it when prior_prompts varied the prompt
        examples.append(Example(name, caption.read_text() if caption.is_file()
                                else concepts[concept].class_prompt, image.size, image,
                                concept=concept))
    return examples
