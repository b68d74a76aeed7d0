"""Output: the trained pipeline as fp16 safetensors, training.json, samples, one streamed tarball.

The tarball holds at its top level a diffusers pipeline folder (`model_index.json`, `unet/`,
`text_encoder/`, `vae/`, `tokenizer/`, `scheduler/`) that `DiffusionPipeline.from_pretrained`
loads offline, `training.json`, and `samples/` when sample images were asked for.
"""

from __future__ import annotations

import json
import os
import tarfile
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "pillow",
            "pillow-heif", "bitsandbytes", "cog")


def save_pipeline(pipe, folder: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write the pipeline as safetensors in `dtype` (casts the pipeline in place)."""
    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 loads a model in the dtype its config names, diffusers loads in fp32 unless
    # told otherwise: left as "float16", a plain `from_pretrained` gives an fp16 text encoder
    # beside an fp32 UNet, and generation fails. fp32 makes it consistent; torch_dtype overrides.
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, dtype="float32"), indent=2) + "\n")


def save_images(images, folder: Path, stem: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(images):
        names.append(f"{stem}-{i:03d}.png")
        image.save(folder / names[-1])
    return names


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_tar(folder: Path, output: Path) -> int:
    """Stream every file under `folder` into an uncompressed tarball at `output` (written under a
    temporary name and renamed, so a crash never leaves a half tarball). Returns its size."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    os.replace(partial, output)
    return output.stat().st_size
