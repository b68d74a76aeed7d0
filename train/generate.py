"""The generator: images of the trained subject from the trainer's tarball, on the command line
(`python -m train.generate`) and in the Cog generator (generate.py, the same settings).

    python -m train.generate --weights dog.tar --prompt "a photo of sks dog on the beach" \
        --output images/                 # writes images/image-000.png, ...
    python -m train.generate --weights dog.tar --model tiny ...   # a LoRA on a built-in base

Every setting is a GenerateConfig field: its default, bounds and one-line doc live there, and
the CLI flags and generate.py's Cog inputs derive from it. Any output the trainer writes loads
(train/trained.py): a diffusers folder, a single file, or a LoRA on the base model (`model`,
BASE_MODEL in Cog), at lora_scale. The Generator keeps what a server reuses between
predictions: the pipeline last used, the base model when LoRAs need it, and the unpacked
tarballs in a cache bounded in size.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import families
from .cleanup import remove
from .cli import Parser, add_settings
from .config import check_prompt, coerce, setting
from .errors import UserError, exit_status
from .models import load_pipeline
from .quiet import quiet_libraries
from .sampling import generate, sampler
from .trained import (add_lora, cached, format_of, load_full, make_room, record, remove_lora,
                      set_lora_scale, unpack)

# Replicate's Stable Diffusion models' scheduler names -> train/sampling.py's samplers.
SCHEDULERS = {"DPMSolverMultistep": "dpm++", "DDIM": "ddim", "K_EULER": "euler",
              "K_EULER_ANCESTRAL": "euler_a", "PNDM": "pndm"}


@dataclass
class GenerateConfig:
    prompt: str = setting(
        "", "Prompt; put the trained subject's identifier in it, e.g. 'a photo of sks dog on "
            "the beach'")
    negative_prompt: str | None = setting(None, "What the images should not show")
    width: int = setting(
        0, "Width in pixels, a multiple of 8 (0 = the model's own: 512 for SD 1.x, 768 for SD "
           "2.x, 1024 for SDXL)", ge=0, le=2048)
    height: int = setting(
        0, "Height in pixels, a multiple of 8 (0 = the model's own)", ge=0, le=2048)
    num_outputs: int = setting(1, "Number of images", ge=1, le=8)
    # 25 DPM-Solver++ steps: the trainer measured them at least as accurate as the base
    # model's own sampler in 50 (its class_scheduler default), at half the time.
    num_inference_steps: int = setting(25, "Denoising steps", ge=1, le=500)
    guidance_scale: float | None = setting(
        None, "Guidance scale: how closely the images follow the prompt (default: the "
              "family's: 7.5 for SD 1.x/2.x/XL, 4.5 for SD 3.x, 3.5 for FLUX.1)",
        ge=0.0, le=50.0)
    scheduler: str = setting("DPMSolverMultistep", "Sampler", choices=list(SCHEDULERS))
    seed: int | None = setting(
        None, "Random seed: the same seed gives the same images (empty = a random one, "
              "printed in the logs)", ge=0, le=4294967295)
    lora_scale: float = setting(
        1.0, "Strength of LoRA weights (0 = the base model alone, 1 = as trained); full "
             "fine-tunes ignore it", ge=0.0, le=4.0)
    weights: str | None = setting(
        None, "The trained weights: the tarball the trainer returned (default: the model's "
              "own, COG_WEIGHTS); the CLI also takes its untarred folder")
    model: str = setting(
        "weights", "Base model a LoRA or a single file is loaded on: a diffusers folder or a "
                   "built-in name (tiny, tiny-sd2, tiny-sdxl, tiny-sd3, tiny-flux, tiny-flux2); "
                   "Cog reads BASE_MODEL", cog=False)
    output: str = setting("images", "Folder the PNG images are written to", cog=False)

    def __post_init__(self):
        coerce(self)
        for name in ("prompt", "negative_prompt"):
            check_prompt(name, getattr(self, name))
        if not self.prompt.strip():
            raise UserError("prompt is empty: describe the image, with the trained subject's "
                            "identifier, e.g. 'a photo of sks dog on the beach'")
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise UserError(f"{name} must be a multiple of 8 (got {getattr(self, name)}); "
                                f"try {getattr(self, name) // 8 * 8}")


def draw(pipe, config: GenerateConfig, log=print) -> list:
    """config.num_outputs images of the prompt (PIL), at the model's own size unless given."""
    kind = families.of(pipe)
    if config.negative_prompt and not getattr(families.get(kind), "NEGATIVE_PROMPT", True):
        raise UserError(f"{families.FAMILY_NAMES[kind]} takes no negative prompt: leave "
                        f"negative_prompt empty")
    own = families.default_resolution(pipe)
    # SD 3.x and FLUX take sides in multiples of 16 (2x2 patches of latents).
    side = families.get(families.of(pipe)).SIDE_MULTIPLE
    size = tuple((n or own) // side * side for n in (config.width, config.height))
    seed = config.seed if config.seed is not None else secrets.randbelow(1 << 32)
    scheduler = sampler(pipe, SCHEDULERS[config.scheduler])
    # A flow-matching model draws with its own sampler whatever the setting (sampling.py).
    name = (config.scheduler if scheduler is not pipe.scheduler
            else type(scheduler).__name__.removesuffix("Scheduler"))
    guidance = (config.guidance_scale if config.guidance_scale is not None
                else families.get(families.of(pipe)).DEFAULTS["guidance_scale"])
    log(f"generating {config.num_outputs} image(s) of {size[0]}x{size[1]}, seed {seed}, "
        f"{config.num_inference_steps} {name} steps, guidance {guidance:g}")
    return generate(pipe, config.prompt, config.num_outputs, batch_size=config.num_outputs,
                    steps=config.num_inference_steps, guidance=guidance, seed=seed,
                    resolution=size, negative_prompt=config.negative_prompt, label="images",
                    scheduler=scheduler, log=log)


def key_of(url: str | None, path: Path | None) -> str:
    """A cache key: the URL's hash (a URL names one tarball), else the file's."""
    digest = hashlib.sha256()
    # Prefixed, so that no file's bytes can hash to the key of someone's URL.
    if url:
        digest.update(b"url\0" + url.encode())
    else:
        digest.update(b"file\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:24]


class Generator:
    """What a generator keeps between predictions. `work` holds the cache of unpacked tarballs
    (work/cache/KEY, at most max_cache_bytes together) and a built-in base's configs."""

    def __init__(self, base: str, device, work: Path, max_cache_bytes: int, log=print):
        self.base, self.device, self.work, self.log = base, torch.device(device), work, log
        self.max_cache_bytes = max_cache_bytes
        # Half precision on a GPU (bf16 where supported: SDXL's VAE overflows fp16); fp32 on CPU.
        self.dtype = (torch.float32 if self.device.type != "cuda" else torch.bfloat16
                      if torch.cuda.is_bf16_supported() else torch.float16)
        self.base_pipe = None  # loaded on the first LoRA, kept for the next
        self.current: tuple[str, object, str] | None = None  # (key, pipeline, format)
        self.pinned: set[str] = set()  # keys the cache never removes (the model's own weights)

    def unpacked(self, key: str, tarball: Path, what: str, name: str,
                 download=None) -> Path:
        """The unpacked folder of `key`: from the cache, or `download()` (if given) fills
        `tarball`, which is then unpacked into the cache."""
        cache = self.work / "cache"
        folder = cached(cache, key)
        if folder is not None:
            self.log(f"{what}: {name} is in the cache")
            return folder
        if download is not None:
            download()
        cache.mkdir(parents=True, exist_ok=True)
        keep = self.pinned | ({self.current[0]} if self.current else set())

        def room(nbytes: int) -> None:  # the expanded size, known once the tarball is checked
            for old in make_room(cache, self.max_cache_bytes, nbytes, keep):
                self.log(f"{what}: removed {old} from the cache to make room")

        return unpack(tarball, cache / key, what, name, room)

    def pipeline(self, key: str, folder: Path, what: str, name: str, lora_scale: float = 1.0):
        """The pipeline of the trained folder (loaded unless it is the one last used), with a
        LoRA at `lora_scale`."""
        if self.current is None or self.current[0] != key:
            self.current = None  # the previous weights go before the next are loaded
            try:
                fmt = format_of(folder, what, name)
            except UserError:
                self._forget(key, folder)
                raise
            if fmt == "lora" and self.base_pipe is None:
                # The server's own model: its failure is no fault of the tarball's.
                self.base_pipe = self._load(lambda: load_pipeline(self.base, self.device))
            try:
                pipe = self._load_trained(folder, fmt, what, name)
            except UserError:
                self._forget(key, folder)
                raise
            self.current = (key, pipe, fmt)
            self.log(f"{what}: loaded {name} ({fmt}, {families.FAMILY_NAMES[families.of(pipe)]})")
        key, pipe, fmt = self.current
        if fmt == "lora":
            set_lora_scale(pipe, lora_scale)
        return pipe

    def _load_trained(self, folder: Path, fmt: str, what: str, name: str):
        trained = record(folder, what, name)
        if fmt != "lora":
            return self._load(lambda: load_full(folder, self.base, self.device, what, name,
                                                configs=self.work / "configs"))
        remove_lora(self.base_pipe)
        add_lora(self.base_pipe, folder, trained, self.base, what, name)
        return self.base_pipe

    def _forget(self, key: str, folder: Path) -> None:
        """Drop from the cache a tarball that failed to load: the same URL may serve a mended
        one next (the model's own stays: setup said what is wrong with it)."""
        if folder.parent == self.work / "cache" and key not in self.pinned:
            remove(folder)

    def _load(self, load):
        pipe = load()  # in fp32
        if self.dtype != torch.float32:
            pipe.to(dtype=self.dtype)
        return pipe


def run(config: GenerateConfig, log=print) -> list[Path]:
    """The command line's job: load config.weights (a tarball or an untarred folder), draw,
    write the PNGs into config.output; returns their paths."""
    if not config.weights:
        raise UserError("weights is required: the tarball the trainer wrote (or its untarred "
                        "folder)")
    source = Path(config.weights)
    if not source.exists():
        raise UserError(f"weights: {source} does not exist")
    quiet_libraries(loading=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix=f"dreambooth-gen-{os.getpid()}-"))
    try:
        generator = Generator(config.model, device, work, max_cache_bytes=0, log=log)
        folder = (source if source.is_dir() else
                  generator.unpacked("weights", source, "weights", source.name))
        pipe = generator.pipeline("weights", folder, "weights", source.name, config.lora_scale)
        images = draw(pipe, config, log)
    finally:
        remove(work)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(out / f"image-{i:03d}.png")
        image.save(paths[-1])
    log(f"wrote {', '.join(str(p) for p in paths)}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m train.generate",
                    description="Images of the trained subject from the trainer's tarball.")
    args = add_settings(parser, GenerateConfig, ("weights", "prompt")).parse_args(argv)
    quiet_libraries()
    return exit_status(lambda: run(GenerateConfig(**vars(args))))


if __name__ == "__main__":
    sys.exit(main())
