"""Base models: load a diffusers folder or a single-file checkpoint, or build a built-in model.

Built-in names (no download, random weights fixed by a seed):
  tiny         Stable Diffusion 1.5's block layout at toy widths; builds in about a second,
               trains at tens of steps per second on a CPU. For trials and tests.
  tiny-sd2     SD 2.x (768 px, v-prediction) at toy widths: OpenCLIP-style gelu text encoder,
               linear projections in the UNet, SD 2.1's DDIM scheduler.
  tiny-sdxl    SDXL at toy widths: three UNet levels, two text encoders (CLIP-L and
               bigG-style with projection), text_time conditioning, SDXL's Euler scheduler.
  tiny-sd3     SD 3.5 at toy widths: the MMDiT transformer with qk-norm, CLIP-L, bigG and T5
               text encoders, the 16-channel VAE, the flow-matching scheduler shifted by 3.
  tiny-flux    FLUX.1 [dev] at toy widths: double- and single-stream blocks, rotary positions,
               the guidance embedding, CLIP-L pooled and T5, FLUX's VAE and dynamic shift.
  tiny-flux2   FLUX.2 [klein] at toy widths: its transformer (4-axis rotary positions, no
               guidance input), the 32-channel VAE with its batch norm, a 28-layer Qwen3 and
               an offline Qwen tokenizer with Qwen3's chat template.
  random-sd15  The full-size SD 1.5 architecture (860 M UNet, CLIP-L text encoder, full VAE).
               Speed and memory are those of the real model: for GPU benchmarks.
  random-sd35-large, random-flux-dev, random-flux2-klein
               SD 3.5 Large (8.1 B), FLUX.1 [dev] (11.9 B) and FLUX.2 [klein] 4B at full
               size, their text encoders included (T5-XXL, Qwen3-4B): for GPU benchmarks and
               for counting FLOPs and memory on the meta device.

Shipped pretrained (a diffusers folder in the project, made by its own script):
  toy          SD 1.x family at 64 px, pretrained on the toy world of shapes (toy/world.py)
               by toy/pretrain.py; it follows prompts such as "a photo of a red star on a
               blue background". For measuring DreamBooth for real (toy/bench.py).

    python -c "from train.models import load_pipeline; print(load_pipeline('tiny', 'cpu'))"

A single-file `.safetensors` checkpoint loads with diffusers' `from_single_file`, taking its
configs and tokenizers from `config_folder`, a diffusers folder of the same family (in production
the `weights/` folder that script/download-weights fills).

All use small offline tokenizers (train/tokenizers.py): the only part diffusers would
otherwise download. Each family builds its own built-ins (train/families: build).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import families
from .errors import UserError
from .families import BUILTINS, FAMILY_NAMES, PIPELINES
from .intake import input_path
from .single_file import checkpoint_family

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# The lab's pretrained toy model lives beside the package, in the checkout (not in the Cog image).
SHIPPED = {"toy": Path(__file__).resolve().parent.parent / "toy" / "model"}


def load_pipeline(model: str, device: torch.device | str, config_folder: str | None = None,
                  what: str = "model", dtype: torch.dtype = torch.float32):
    """The pipeline of any family (train/families) on `device`, safety checker off, from local
    files only: its weights in `dtype` (fp32 by default), the VAE's always in fp32.
    `config_folder` is needed (and only used) for a single file; `what` is the input that named
    the model, for the errors."""
    import diffusers

    model = str(SHIPPED.get(model, model))
    kind = check_model(model, config_folder, what)
    if model in BUILTINS:
        pipe = build_builtin(model, device)
    else:
        family = families.get(kind)
        cls = getattr(diffusers, family.PIPELINE)
        options = dict(dtype=dtype, local_files_only=True, **family.LOAD_OPTIONS)
        try:
            if Path(model).is_dir():
                pipe = cls.from_pretrained(model, **options)
            else:
                pipe = _from_single_file(cls, Path(model), str(config_folder), options)
            pipe.to(device)  # a tensor the file lacked is still on the meta device: fails here
        except OSError as e:  # a folder missing a file, or holding one that cannot be read
            raise UserError(f"{named(model, what)} could not be loaded ({str(e).strip()[:300]}): "
                            f"pass a complete diffusers folder (as save_pretrained writes it) or "
                            f"a single-file checkpoint") from None
        except (ValueError, KeyError, NotImplementedError, SafetensorError) as e:
            # Names that pass check_model, contents that do not fit: wrong shapes, missing parts.
            reason = ("some of its weights are missing" if isinstance(e, NotImplementedError)
                      else str(e).split(". ")[0].replace("Cannot load  because ", "")[:200])
            raise UserError(f"{named(model, what)} does not fit the {FAMILY_NAMES[kind]} "
                            f"architecture its names claim ({reason}): pass a full checkpoint or "
                            f"folder of the base model's architecture") from None
    # A folder without a component's subfolder loads with None in its place.
    missing = [name for name, part in pipe.components.items()
               if part is None and name not in OPTIONAL_COMPONENTS]
    if missing:
        raise UserError(f"{named(model, what)} has no {', '.join(missing)}: pass a complete "
                        f"diffusers folder (as save_pretrained writes it)")
    if hasattr(families.get(kind), "loaded"):  # FLUX.2: Qwen3's pad id
        families.get(kind).loaded(pipe)
    if model in BUILTINS and dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.vae.to(dtype=torch.float32)  # it encodes each image once; SDXL's overflows in fp16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_single_file(cls, path: Path, config_folder: str, options: dict):
    """diffusers reads a file as safetensors only by its suffix (else it unpickles it): give a
    suffix-less upload one through a symlink."""
    if path.suffix.lower() == ".safetensors":
        return cls.from_single_file(str(path), config=config_folder, **options)
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / "checkpoint.safetensors"
        named.symlink_to(path.resolve())
        return cls.from_single_file(str(named), config=config_folder, **options)


# What a pipeline may lack (loaded without them: the trainer uses only the UNet, text encoders,
# tokenizers, VAE and scheduler).
OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def named(model: str, what: str) -> str:
    """How errors name a model: by its path given as `model` on the command line; by the input
    and the file's name for a base_checkpoint (over HTTP, a temp file of the server's)."""
    return f"model {model!r}" if what == "model" else f"{what}: {Path(model).name}"


def check_model(model: str, config_folder: str | None = None, what: str = "model") -> str:
    """Refuse a model that cannot load, in milliseconds and before any weights are read; return
    its family ("sd1", "sd2" or "sdxl"). A single file is recognised by its key names alone.
    `what` is the input that named it, for the errors."""
    model = str(SHIPPED.get(model, model))
    if model in BUILTINS:
        return BUILTINS[model][0]
    path = Path(model)
    if not path.exists():
        raise UserError(
            f"model {model!r} not found: run script/download-weights to fetch Stable "
            f"Diffusion 1.5 into weights/, or pass a diffusers folder, a .safetensors checkpoint "
            f"or a built-in name ({', '.join([*BUILTINS, *SHIPPED])})")
    input_path(model, what, "a diffusers folder or a .safetensors checkpoint")  # no FIFO
    if path.is_dir():
        return _folder_family(path, what)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{named(model, what)} is a pickle checkpoint, which is not loaded here (unpickling "
            f"can run code): convert it to .safetensors, e.g. safetensors.torch.save_file("
            f"torch.load(path, weights_only=True)['state_dict'], 'model.safetensors')")
    kind = _file_family(path, named(model, what))
    if config_folder is None:
        raise UserError(
            f"{named(model, what)} is a single-file {FAMILY_NAMES[kind]} checkpoint and needs a "
            f"config folder: pass a diffusers folder of the same family (e.g. weights/ as "
            f"script/download-weights fills it) for its configs and tokenizer")
    folder_kind = _folder_family(Path(config_folder), "config folder")
    if folder_kind != kind:
        raise UserError(
            f"{named(model, what)} is an {FAMILY_NAMES[kind]} checkpoint but config folder "
            f"{str(config_folder)!r} is {FAMILY_NAMES[folder_kind]}: pass a config folder of the "
            f"same family")
    return kind


def _folder_family(path: Path, what: str) -> str:
    """Check that `path` is a diffusers SD or SDXL folder and read its family from the configs."""
    if not path.is_dir():
        raise UserError(f"{what} {str(path)!r} not found: pass a diffusers folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{what} {str(path)!r} is not a diffusers folder (no model_index.json): "
                        f"pass the pipeline's top folder, or a single-file .safetensors checkpoint")
    components = _read_json(index, what)
    kind = components.get("_class_name")
    # transformers makes up a two-word tokenizer for a missing tokenizer folder: refuse here.
    lacking = sorted(name for name, entry in components.items()
                     if isinstance(entry, list) and entry and entry[0] is not None
                     and name not in OPTIONAL_COMPONENTS and not (path / name).is_dir())
    if lacking:
        raise UserError(f"{what} {str(path)!r} has no {', '.join(f'{n}/' for n in lacking)}: "
                        f"pass a complete diffusers folder (as save_pretrained writes it)")
    if not isinstance(kind, str):
        raise UserError(f"{what} {str(path)!r}: its model_index.json names no pipeline "
                        f"(_class_name): pass a diffusers folder as save_pretrained writes it")
    if kind not in PIPELINES:
        raise UserError(f"{what} {str(path)!r} is a {kind}; only Stable Diffusion 1.x/2.x/XL/3.x "
                        f"({', '.join(sorted(PIPELINES))}) models are supported")
    text = _read_json(path / "text_encoder" / "config.json", what)
    unet = _read_json(path / "unet" / "config.json", what)
    return families.detect(kind, text.get("hidden_act"), unet.get("use_linear_projection"))


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        return {}  # a folder missing a config fails to load later, with diffusers' own message
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: {path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _file_family(path: Path, name: str) -> str:
    """The family of a single-file checkpoint, from its key names (no tensor is read)."""
    try:  # by content, not name: an upload (Cog's base_checkpoint) may have lost its suffix
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"{name} is neither a diffusers folder nor a "
                            f".safetensors checkpoint") from None
        raise UserError(f"{name} is not a readable .safetensors file ({e})") from None
    kind = checkpoint_family(keys)
    if kind is None:
        raise UserError(f"{name} is not a Stable Diffusion checkpoint (no SD 1.x, "
                        f"2.x or XL UNet and text encoder keys): pass a full SD checkpoint, a "
                        f"diffusers folder or a built-in name")
    return kind


def build_builtin(name: str, device: torch.device | str = "cpu"):
    """Build a built-in model (see families.BUILTINS) in code, with weights fixed by seed 0."""
    kind, *configs = BUILTINS[name]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        return families.get(kind).build(kind, *configs)
