"""Cog generator: the trained subject as a model of its own, over the same kind of API as the
trainer. It serves the trainer's tarball, any of its output formats.

    cog predict -f generate.yaml -i weights=@dreambooth-weights.tar \
        -i prompt="a photo of sks dog on the beach"
    # a trained version on Replicate: COG_WEIGHTS names the tarball, and weights can be left out
    # the same server without Docker (docs/generate.md):
    BASE_MODEL=tiny COG_WEIGHTS=http://.../dog.tar script/serve generate

No ML lives here: train/generate.py draws, train/trained.py checks, unpacks and loads tarballs.
The inputs are GenerateConfig's settings, written out as literals by script/schema (cog parses
this file without running it). The weights come from COG_WEIGHTS (Replicate's convention for a
trained version: coglet passes it to setup), loaded in setup so the first prediction finds them
ready, or from the `weights` input (a URL or data: URI, taken as train/cog_files.py takes the
trainer's files), so one image serves every subject. Tarballs are unpacked once and kept, keyed
by URL, in a cache of at most MAX_CACHE_GIB (an environment variable, default 20); the base
model (BASE_MODEL, or weights/ as script/download-weights fills it) is loaded only for a LoRA or
a single file. A bad tarball is one line, and the server stays up for the next prediction.
"""

import os
import tempfile
from pathlib import Path as LocalPath
from typing import Optional

import torch
from cog import BasePredictor, Input, Path

from train import cog_files  # replaces Cog's URLPath.convert: file inputs are fetched here
from train.cleanup import remove, remove_leftovers
from train.config import field_type, fields
from train.errors import UserError
from train.generate import GenerateConfig, Generator, draw, key_of

SETTINGS = {f.name: f for f in fields(GenerateConfig)}
# The inputs that are files (cog.Path): a data: URI Cog decodes, or a URL predict() downloads.
FILES = ("weights",)
ROOT = LocalPath(__file__).resolve().parent
MAX_CACHE_GIB = float(os.environ.get("MAX_CACHE_GIB", 20))


class Predictor(BasePredictor):
    def setup(self, weights: Optional[str] = None):
        """Find the base model, and load the model's own weights (COG_WEIGHTS) if it has any."""
        for name in remove_leftovers(tempfile.gettempdir()):
            print(f"setup: removed {name}, left by a server that was stopped")
        self.work = LocalPath(tempfile.mkdtemp(prefix=f"dreambooth-gen-{os.getpid()}-"))
        self.outputs = self.work / "outputs"
        base = os.environ.get("BASE_MODEL") or str(ROOT / "weights")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = Generator(base, device, self.work, int(MAX_CACHE_GIB * 2**30))
        self.default, self.default_error = None, None
        source = weights or os.environ.get("COG_WEIGHTS")
        if source:
            # A broken COG_WEIGHTS is said in the log and by every prediction that relies on
            # it; the server stays up, and predictions that send weights still work.
            try:
                self.default = self.own_weights(str(source))
                self.generator.pinned.add(self.default[0])  # never evicted for a `weights`
                self.generator.pipeline(*self.default)  # the cold start belongs to setup
            except UserError as e:
                self.default, self.default_error = None, str(e)
                print(f"setup: {e}", flush=True)

    def own_weights(self, source: str) -> tuple:
        """(key, folder, what, name) of COG_WEIGHTS: a URL (downloaded, unpacked into the
        cache, the tarball removed), or a tarball or folder on this machine (an operator's)."""
        what = "COG_WEIGHTS"
        if source.startswith(("http://", "https://")):
            name = source.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "weights.tar"
            tarball, key = self.work / "download" / name, key_of(source, None)
            tarball.parent.mkdir(exist_ok=True)
            try:
                folder = self.generator.unpacked(
                    key, tarball, what, name,
                    lambda: cog_files.download(what, source, str(tarball)))
            finally:
                remove(tarball.parent)
            return key, folder, what, name
        path = LocalPath(source)
        if not path.exists():
            raise UserError(f"{what}: {source} is neither an http(s) URL nor a file or folder")
        if path.is_dir():
            return str(path.resolve()), path, what, path.name
        key = key_of(None, path)  # hashes the whole file: once
        return key, self.generator.unpacked(key, path, what, path.name), what, path.name

    def predict(
        self,
        # Written by script/schema from GenerateConfig: change a setting there, run it.
        prompt: str = Input(
            description="Prompt; put the trained subject's identifier in it, e.g. 'a photo of sks dog on the beach'"),
        negative_prompt: Optional[str] = Input(
            default=None,
            description="What the images should not show"),
        width: int = Input(
            default=0, ge=0, le=2048,
            description="Width in pixels, a multiple of 8 (0 = the model's own: 512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL)"),
        height: int = Input(
            default=0, ge=0, le=2048,
            description="Height in pixels, a multiple of 8 (0 = the model's own)"),
        num_outputs: int = Input(default=1, ge=1, le=8, description="Number of images"),
        num_inference_steps: int = Input(default=25, ge=1, le=500, description="Denoising steps"),
        guidance_scale: Optional[float] = Input(
            default=None, ge=0.0, le=50.0,
            description="Guidance scale: how closely the images follow the prompt (default: the family's: 7.5 for SD 1.x/2.x/XL, 4.5 for SD 3.x, 3.5 for FLUX.1)"),
        scheduler: str = Input(
            default="DPMSolverMultistep", choices=["DPMSolverMultistep", "DDIM", "K_EULER", "K_EULER_ANCESTRAL", "PNDM"],
            description="Sampler"),
        seed: Optional[int] = Input(
            default=None, ge=0, le=4294967295,
            description="Random seed: the same seed gives the same images (empty = a random one, printed in the logs)"),
        lora_scale: float = Input(
            default=1.0, ge=0.0, le=4.0,
            description="Strength of LoRA weights (0 = the base model alone, 1 = as trained); full fine-tunes ignore it"),
        weights: Optional[Path] = Input(
            default=None,
            description="The trained weights: the tarball the trainer returned (default: this model's own, COG_WEIGHTS)"),
        # End of what script/schema writes.
    ) -> list[Path]:
        """Images of the trained subject: PNGs."""
        inputs = {name: value for name, value in locals().items() if name in SETTINGS}
        try:
            return self.generate(inputs)
        finally:
            cog_files.clear()

    def generate(self, inputs: dict) -> list[Path]:
        for name, value in inputs.items():
            # JSON has one number type: 3.0 arrives as a float (see predict.py).
            if isinstance(value, float) and value.is_integer() \
                    and field_type(SETTINGS[name], GenerateConfig) is int:
                inputs[name] = int(value)
        weights = inputs.pop("weights")
        config = GenerateConfig(**inputs, model=self.generator.base)  # checked before loading
        pipe = self.generator.pipeline(*self.weights(weights), lora_scale=config.lora_scale)
        images = draw(pipe, config, log=lambda line: print(line, flush=True))
        # Only the latest outputs are kept: Cog has delivered the previous ones by now.
        remove(self.outputs)
        self.outputs.mkdir()
        paths = []
        for i, image in enumerate(images):
            paths.append(Path(self.outputs / f"image-{i:03d}.png"))
            image.save(paths[-1])
        return paths

    def weights(self, value) -> tuple:
        """(key, folder, what, name) of the weights a prediction uses: the `weights` input
        (from the cache, or downloaded and unpacked into it), else the model's own."""
        if value is None:
            if self.default_error:
                raise UserError(self.default_error)
            if self.default is None:
                raise UserError("weights: none sent, and this model has no weights of its own "
                                "(COG_WEIGHTS): send the tarball the trainer returned")
            return self.default
        path, url = cog_files.source("weights", value)
        path = LocalPath(path)
        key = key_of(url, path)
        download = (lambda: cog_files.download("weights", url, str(path))) if url else None
        return key, self.generator.unpacked(key, path, "weights", path.name, download), \
            "weights", path.name
