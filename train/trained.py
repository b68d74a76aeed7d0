"""Trained weights: the trainer's tarball (or its untarred folder) checked, unpacked and loaded
as a pipeline that draws the subject, whatever output formats it holds. The generator
(train/generate.py, generate.py) and the evaluation load trained outputs through here.

    folder = unpack(Path("dog.tar"), cache / "dog", "weights")   # checked, file by file
    pipe = load_full(folder, base="weights", device="cpu", what="weights")  # diffusers/single file
    add_lora(base_pipe, folder, record(folder, "weights"), "weights")       # or a LoRA

The formats, in the order they are taken when a tarball holds several (format_of):
  diffusers    model_index.json and its component folders: a whole pipeline
  single_file  model.safetensors: the base model's configs and tokenizers with these weights
  transformer  transformer.safetensors (SD 3.x, FLUX): the base model with this transformer
  lora         lora/pytorch_lora_weights.safetensors (or the kohya-layout lora.safetensors):
               an adapter on the base model, its strength set per prediction (set_lora_scale)
A tarball is read as a resume tarball is: a plain or compressed tar of files, no links, no path
outside its folder, no pickle (.bin, .ckpt, .pt: unpickling runs code), within a file count and
an expanded size (at most MAX_RATIO times the tarball, never past the free disk); what it holds
must be what the trainer writes (training.json at its top). Anything else is one UserError line
that names the tarball as the client sent it, never a path of the server.

The cache: unpacked tarballs under one folder, one folder per key (a URL's hash), the least
recently used removed when together they pass a size bound (make_room).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath

from safetensors import SafetensorError, safe_open

from . import families
from .card import base_model_id
from .cleanup import remove
from .errors import UserError, out_of_disk
from .families import BUILTINS, FAMILY_NAMES
from .intake import Limits, decompressor, looks_like_tar, member_problem, tar_members
from .models import PICKLE_SUFFIXES, SHIPPED, build_builtin, check_model, load_pipeline
from .single_file import checkpoint_family

FORMATS = (("diffusers", "model_index.json"), ("single_file", "model.safetensors"),
           ("transformer", "transformer.safetensors"),
           ("lora", "lora/pytorch_lora_weights.safetensors"), ("lora", "lora.safetensors"))
MAX_FILES = 10000  # entries, folders included; an SDXL folder with samples holds about 50
MAX_RATIO = 20.0   # safetensors hardly compress: a tarball that expands more is a bomb
MAX_NAME = 1000    # characters in a member's path; the trainer's are under 100
MAX_INDEX_BYTES = 16 << 20  # a shard index of an SDXL UNet is about 100 KiB
ADVICE = "send the tarball the trainer returned"
ADAPTER = "trained"  # the name the trained LoRA is loaded under
# kohya's ss_base_model_version -> family, for a LoRA whose training.json names no family.
KOHYA_FAMILIES = {families.get(kind).KOHYA["versions"][kind]: kind for kind in FAMILY_NAMES
                  if families.get(kind).KOHYA}  # FLUX.2 has no kohya layout


def unpack(tarball: Path, dest: Path, what: str, name: str | None = None,
           room=None) -> Path:
    """Unpack the trainer's `tarball` into `dest` (written as dest.partial and renamed, so a
    crash or a cancel never leaves a half folder); returns `dest`. `what` and `name` (the file's
    name as the client knows it) are for the errors; `room(nbytes)`, if given, is called with
    the expanded size once the tarball has passed its checks, before anything is written."""
    name = name or tarball.name
    if not looks_like_tar(tarball):
        raise UserError(f"{what}: {name} is not a tarball; {ADVICE} (a .tar)")
    free = shutil.disk_usage(dest.parent).free
    compressed = decompressor(tarball) is not None  # decompressed to a temp file first
    limits = Limits(max_files=MAX_FILES, max_ratio=MAX_RATIO, advice=ADVICE,
                    max_bytes=min(int(tarball.stat().st_size * MAX_RATIO),
                                  free // 2 if compressed else free))
    members = {}
    for member, stream in tar_members(tarball, what, limits):
        problem = _problem(member)
        if problem:
            raise UserError(f"{what}: {name} holds {problem} ({member.name[:200]!r}); {ADVICE}")
        members[PurePosixPath(member.name)] = (member, stream)
    for path, (member, stream) in members.items():
        clash = next((parent for parent in path.parents if parent in members), None)
        if clash is not None:
            raise UserError(f"{what}: {name} holds {str(clash)!r} both as a file and as a "
                            f"folder; {ADVICE}")
        if path.name.endswith(".index.json"):
            _check_index(path, stream, what, name)
    # The trainer writes its files at the top; a tarball of the untarred folder has one level.
    tops = [p for p in members if p.name == "training.json" and len(p.parts) <= 2]
    if len(tops) != 1:
        raise UserError(f"{what}: {name} is not a tarball the trainer wrote (it holds "
                        f"{len(tops)} training.json at its top, not 1); {ADVICE}")
    top = tops[0].parent
    ours = {path: stream for path, (_, stream) in members.items()
            if top == PurePosixPath(".") or top in path.parents}  # beside it: not part of it
    if room is not None:
        room(sum(member.size for path, (member, _) in members.items() if path in ours))
    partial = dest.with_name(dest.name + ".partial")
    remove(partial)  # from a server killed while unpacking
    try:
        for path, stream in ours.items():
            target = partial / path.relative_to(top)
            target.parent.mkdir(parents=True, exist_ok=True)
            with stream() as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        remove(dest)
        os.replace(partial, dest)
    except BaseException as e:  # a full disk, a cancel: an unpacked folder or none
        remove(partial)
        if isinstance(e, OSError) and out_of_disk(e):
            raise UserError(f"{what}: the server's disk is full; {name} could not be "
                            f"unpacked") from None
        raise
    return dest


def _problem(member) -> str | None:
    """What is wrong with a tarball member, if anything: what the trainer writes is plain
    files with ordinary names, and never a pickle."""
    path = PurePosixPath(member.name)
    problem = member_problem(member)
    if problem:
        return problem
    if len(member.name) > MAX_NAME or any(len(os.fsencode(p)) > 255 for p in path.parts):
        return "a name too long for a file"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "a pickle, which is not loaded here (unpickling can run code)"
    return None


def _check_index(path: PurePosixPath, stream, what: str, name: str) -> None:
    """A shard index (*.index.json) makes diffusers and transformers load the files it names,
    whatever their suffix, a pickled shard included: it may name only .safetensors files."""
    with stream() as f:
        payload = f.read(MAX_INDEX_BYTES + 1)
    try:
        shards = json.loads(payload)["weight_map"].values()
    except (ValueError, KeyError, TypeError, AttributeError):
        shards = None
    if len(payload) > MAX_INDEX_BYTES or shards is None or not all(
            isinstance(s, str) and s.endswith(".safetensors") and "/" not in s for s in shards):
        raise UserError(f"{what}: {name} holds a weight index ({str(path)!r}) that names files "
                        f"other than .safetensors; {ADVICE}")


def record(folder: Path, what: str, name: str | None = None) -> dict:
    """The training.json of a trained folder, checked to be the trainer's."""
    name = name or folder.name
    try:
        data = json.loads((folder / "training.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{what}: {name} holds no readable training.json; {ADVICE}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or any(
            not isinstance(value, (str, type(None))) for value in (
                data.get("family"), data.get("base_model"), data["config"].get("model"))):
        raise UserError(f"{what}: the training.json of {name} is not the trainer's; {ADVICE}")
    return data


def format_of(folder: Path, what: str, name: str | None = None) -> str:
    """Which of the formats the folder's weights are taken from (see FORMATS)."""
    for fmt, marker in FORMATS:
        if (folder / marker).is_file():
            return fmt
    raise UserError(f"{what}: {name or folder.name} holds no weights (no model_index.json, "
                    f"model.safetensors or LoRA file); {ADVICE}")


def load_full(folder: Path, base: str, device, what: str, name: str | None = None,
              configs: Path | None = None):
    """The pipeline of a folder's full weights: its diffusers folder, or its single file with
    the configs and tokenizers of `base` (a built-in base is written out to `configs` first)."""
    name = name or folder.name
    fmt = format_of(folder, what, name)
    if fmt == "transformer":
        return _with_transformer(folder / "transformer.safetensors", base, device, what, name,
                                 configs)
    if fmt == "single_file":
        _same_family(folder / "model.safetensors", base, what, name)
    try:
        if fmt == "diffusers":
            return load_pipeline(str(folder), device, what=what)
        if fmt == "single_file":
            return load_pipeline(str(folder / "model.safetensors"), device,
                                 config_folder=config_folder(base, configs), what=what)
    except UserError as e:
        raise UserError(_renamed(str(e), folder, what, name)) from None
    raise ValueError(f"{folder} holds a LoRA, not full weights: use add_lora")


def _with_transformer(path: Path, base: str, device, what: str, name: str,
                      configs: Path | None):
    """The base model (SD 3.x or FLUX) with the transformer of an original-layout file in
    place of its own."""
    import diffusers

    ours = check_model(base)
    try:
        with safe_open(path, framework="pt") as f:
            theirs = (f.metadata() or {}).get("family")
    except (SafetensorError, OSError):
        raise UserError(f"{what}: {name} holds an unreadable transformer.safetensors; "
                        f"{ADVICE}") from None
    if theirs != ours:
        raise UserError(f"{what}: {name} holds a transformer for "
                        f"{FAMILY_NAMES.get(theirs, 'another model')}, and this server's base "
                        f"model is {FAMILY_NAMES[ours]}: serve it on the base model it was "
                        f"trained on (BASE_MODEL)")
    pipe = load_pipeline(base, device, what=what)
    cls = getattr(diffusers, type(pipe.transformer).__name__)
    pipe.transformer = cls.from_single_file(
        str(path), config=config_folder(base, configs), subfolder="transformer",
        local_files_only=True, torch_dtype=pipe.transformer.dtype).to(device)
    return pipe


def _same_family(path: Path, base: str, what: str, name: str) -> None:
    """A single file takes the base model's configs: refuse one of another family in words of
    the client's, before diffusers names the server's folders."""
    try:
        with safe_open(path, framework="pt") as f:
            theirs = checkpoint_family(list(f.keys()))
    except (SafetensorError, OSError):
        return  # unreadable: load_pipeline says so
    ours = check_model(base)
    if theirs is not None and theirs != ours:
        raise UserError(f"{what}: {name} holds an {FAMILY_NAMES[theirs]} single file, and this "
                        f"server's base model, whose configs it needs, is {FAMILY_NAMES[ours]}: "
                        f"serve it on an {FAMILY_NAMES[theirs]} base model (BASE_MODEL)")


def config_folder(base: str, configs: Path | None) -> str:
    """A diffusers folder giving a single file of `base`'s family its configs and tokenizers:
    `base` itself, or for a built-in, the built-in written to `configs` (once)."""
    if base not in BUILTINS:
        return str(SHIPPED.get(base, base))
    if configs is None:
        raise ValueError("a built-in base needs a folder to write its configs to")
    if not (configs / "model_index.json").is_file():
        partial = configs.with_name(configs.name + ".partial")
        remove(partial)
        build_builtin(base).save_pretrained(partial)
        os.replace(partial, configs)
    return str(configs)


def add_lora(pipe, folder: Path, trained: dict, base: str, what: str,
             name: str | None = None) -> None:
    """Load the folder's LoRA into `pipe` (the base model) as adapter ADAPTER, after checking
    it was trained for this base: its family, and the base's name where both are known."""
    name = name or folder.name
    ours = families.of(pipe)
    kohya = folder / "lora.safetensors"
    theirs = trained.get("family") or (_kohya_family(kohya) if kohya.is_file() else None)
    if theirs in FAMILY_NAMES and theirs != ours:
        raise UserError(f"{what}: {name} is a LoRA for {FAMILY_NAMES[theirs]}, and this "
                        f"server's base model is {FAMILY_NAMES[ours]}: serve it on the "
                        f"{FAMILY_NAMES[theirs]} base model it was trained on (BASE_MODEL)")
    trained_on = trained["config"].get("model")
    if (trained_on in BUILTINS or base in BUILTINS) and trained_on != base:
        raise UserError(f"{what}: {name} is a LoRA trained on {trained_on!r}, and this "
                        f"server's base model is {base!r}: serve it on the base model it was "
                        f"trained on (BASE_MODEL)")
    base_id, their_id = base_model_id(base), trained.get("base_model")
    if base_id and their_id and base_id != their_id:
        raise UserError(f"{what}: {name} is a LoRA trained on {their_id}, and this server's "
                        f"base model is {base_id}: serve it on the base model it was trained on")
    diffusers_layout = folder / "lora" / "pytorch_lora_weights.safetensors"
    path, weight_name = ((diffusers_layout.parent, diffusers_layout.name)
                         if diffusers_layout.is_file() else (folder, kohya.name))
    try:
        pipe.load_lora_weights(str(path), weight_name=weight_name, adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError,
            AssertionError) as e:  # diffusers' FLUX kohya reader asserts FLUX.1's widths
        remove_lora(pipe)
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}: the LoRA of {name} does not fit this server's base model "
                        f"({_renamed(reason, folder, what, name)}); {ADVICE}") from None


def remove_lora(pipe) -> None:
    """Take the trained adapter out of the base pipeline again (if it holds one)."""
    adapters = {a for names in pipe.get_list_adapters().values() for a in names}
    if ADAPTER in adapters:
        pipe.delete_adapters(ADAPTER)


def set_lora_scale(pipe, scale: float) -> None:
    """The trained adapter's strength: 0 is the base model alone, 1 as trained."""
    pipe.set_adapters([ADAPTER], adapter_weights=[scale])


def _kohya_family(path: Path) -> str | None:
    try:
        with safe_open(path, framework="pt") as f:
            version = (f.metadata() or {}).get("ss_base_model_version")
    except (SafetensorError, OSError):
        return None
    return KOHYA_FAMILIES.get(version)


def _renamed(message: str, folder: Path, what: str, name: str) -> str:
    """An error about an unpacked folder of the server, naming the tarball instead."""
    message = message.replace(f"{what}: {folder.name} ", f"{what}: {name} ")  # named()'s
    return message.replace(repr(str(folder)), name).replace(str(folder), name)


# --- The cache of unpacked tarballs -------------------------------------------------------------

def cached(root: Path, key: str) -> Path | None:
    """The unpacked folder of `key`, if the cache holds it (marked as just used)."""
    folder = root / key
    if not (folder / "training.json").is_file():
        return None
    os.utime(folder)
    return folder


def make_room(root: Path, max_bytes: int, incoming: int, keep: set[str]) -> list[str]:
    """Remove the least recently used folders of the cache until what stays and `incoming`
    bytes fit in `max_bytes` (those in `keep`, in use, stay whatever their size); returns the
    keys removed."""
    entries = []
    for folder in root.iterdir() if root.is_dir() else []:
        if folder.is_dir():
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            entries.append((folder.stat().st_mtime, folder, size))
    total = sum(size for _, _, size in entries) + incoming
    removed = []
    for _, folder, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if folder.name in keep:
            continue
        remove(folder)
        total -= size
        removed.append(folder.name)
    return removed
