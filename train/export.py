"""Output: the trained pipeline as fp16 safetensors, training.json, samples, one streamed tarball.

The tarball holds at its top level a diffusers pipeline folder (`model_index.json`, `unet/`,
`text_encoder/`, `vae/`, `tokenizer/`, `scheduler/`) that `DiffusionPipeline.from_pretrained`
loads offline, `training.json`, and `samples/` when sample images were asked for; the other
formats (`output_format`: one single-file checkpoint, or for SD 3.x and FLUX the transformer in
its original layout; LoRA files) beside it: `export_formats`.
"""

from __future__ import annotations

import json
import os
import tarfile
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import families, lora
from .cleanup import remove
from .single_file import save_single_file
from .transformer_file import save_transformer_file

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "pillow",
            "pillow-heif", "bitsandbytes", "cog")


def save_pipeline(pipe, folder: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write the pipeline as safetensors in `dtype` (casts the pipeline in place), in a layout that
    loads with transformers 5 + diffusers 0.42 and with transformers 4 + older diffusers (the
    AUTOMATIC1111/ComfyUI world): see tests/test_compat.py."""
    from transformers import CLIPTextModel, PreTrainedModel

    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    for name, part in pipe.components.items():
        if isinstance(part, PreTrainedModel):
            # transformers 5 loads a model in the dtype its config names, diffusers loads in fp32
            # unless told otherwise: left as "float16", a plain `from_pretrained` gives an fp16
            # text encoder beside an fp32 UNet, and generation fails. fp32 makes it consistent;
            # torch_dtype overrides.
            _update_json(folder / name / "config.json", dtype="float32")
        if isinstance(part, CLIPTextModel):
            # transformers 5 dropped CLIPTextModel's `text_model.` level and strips the prefix on
            # load; transformers 4 needs it. CLIPTextModelWithProjection (SDXL's text_encoder_2)
            # keeps `text_model.` in both, so only CLIPTextModel is rewritten.
            _prefix_keys(folder / name, "text_model.")
        if type(part).__name__ == "CLIPTokenizer":
            # transformers 5 writes only tokenizer.json; transformers 4's CLIPTokenizer (the class
            # model_index.json names) reads only vocab.json and merges.txt.
            part.backend_tokenizer.model.save(str(folder / name))
        if type(part).__name__ == "T5Tokenizer":
            # transformers 4's T5Tokenizer is the SentencePiece one, which needs spiece.model;
            # its T5TokenizerFast reads tokenizer.json, as 5's T5Tokenizer (the same class) does.
            index[name] = [index[name][0], "T5TokenizerFast"]
        if type(part).__name__.endswith("ImageProcessorPil"):
            # Without torchvision transformers 5 substitutes CLIPImageProcessorPil, a class that
            # transformers 4 cannot import; CLIPImageProcessor loads in both.
            index[name] = [index[name][0], type(part).__name__.removesuffix("Pil")]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _prefix_keys(folder: Path, prefix: str) -> None:
    """Give every tensor key in the safetensors files (and shard index) of `folder` `prefix`."""
    def fix(key: str) -> str:
        return key if key.startswith(prefix) else prefix + key

    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({fix(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    for path in folder.glob("*.safetensors.index.json"):
        shards = json.loads(path.read_text())
        _update_json(path, weight_map={fix(k): v for k, v in shards["weight_map"].items()})


def _update_json(path: Path, **values) -> None:
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **values), indent=2) + "\n")


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
    temporary name and renamed, so a crash never leaves a half tarball; removed if the writing
    fails or is interrupted). Returns its size."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(folder.iterdir()):
                tar.add(path, arcname=path.name)
        os.replace(partial, output)
    except BaseException:  # a full disk, Ctrl-C, a cancel: a finished tarball or none
        remove(partial)
        raise
    return output.stat().st_size


def export_formats(pipe, config, out: Path, base_weights: dict | None) -> list[str]:
    """Write the formats `config.output_format` names into `out`; returns the files and folders
    written. `base_weights` (optim.base_weights) are the weights before training, which
    extract_lora needs."""

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16,
             "fp32": torch.float32}[config.save_precision]
    formats = config.formats()
    written = []
    if "lora" in formats:
        # The trained adapters, or one extracted from the full fine-tune (SD 1.x/2.x/SDXL: the
        # kohya layout alone, which AUTOMATIC1111, ComfyUI and diffusers read; SD 3.x, FLUX:
        # the two files of a trained LoRA).
        files = (lora.save_lora(pipe, out, dtype) if config.use_lora else
                 lora.save_extracted(pipe, base_weights, config.extract_lora, out, dtype))
        written += [str(p.relative_to(out)) for p in files.values()]
    if config.use_lora and {"diffusers", "single_file"} & set(formats):
        lora.merge_lora(pipe)  # full weights with the adapters folded in
    if "single_file" in formats:
        if families.get(families.of(pipe)).DENOISER == "transformer":  # SD 3.x, FLUX
            save_transformer_file(pipe, out / "transformer.safetensors", dtype)
            written.append("transformer.safetensors")
        else:
            save_single_file(pipe, out / "model.safetensors", dtype)
            written.append("model.safetensors")
    if "diffusers" in formats:
        save_pipeline(pipe, out, dtype)
        written.append("model_index.json")
    return written
