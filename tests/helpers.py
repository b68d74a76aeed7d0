"""Shared test helpers: archives and images built in code, fast settings for the `tiny` model, a
tiny run of the recipe. Tests import them (`from helpers import ...`); fixtures live in
conftest.py.

Run the suite with `script/test` (sets up .venv, then pytest), or `pytest` inside the venv.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=DeprecationWarning)

from train import families  # noqa: E402


# Settings that make a full run take seconds on the tiny model.
FAST = dict(model="tiny", resolution=64, num_class_images=2, class_infer_steps=2,
            sample_batch_size=2, max_train_steps=4, learning_rate=1e-4)


def image_bytes(color=(200, 40, 40), size=(64, 48), fmt="JPEG", mode="RGB", exif=None) -> bytes:
    image = Image.new(mode, size, color)
    buffer = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


def untar(tar_path: Path, dest: Path) -> Path:
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    return dest


def read_training_json(folder: Path) -> dict:
    return json.loads((folder / "training.json").read_text())


def train_tiny(tmp_path, photos_zip, name="run", **overrides):
    """Run the recipe on the tiny model; returns (untarred output folder, log lines)."""
    lines = []
    settings = dict(FAST, instance_data=str(photos_zip), instance_prompt="a photo of sks ball",
                    class_prompt="a photo of a ball", output=str(tmp_path / f"{name}.tar"),
                    work_dir=str(tmp_path / f"{name}-work"))
    from train import TrainConfig, run

    config = TrainConfig(**{**settings, **overrides})
    tar = run(config, log=lines.append)
    assert list((tmp_path / f"{name}-work").iterdir()) == [], "work directory left behind"
    return untar(tar, tmp_path / name), lines


def unet_weights(folder) -> dict:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def same_weights(a, b) -> bool:
    """Whether two modules (or two state dicts) hold exactly the same tensors."""
    a, b = (x if isinstance(x, dict) else x.state_dict() for x in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_close(a, b, tol: float = 1e-5) -> None:
    """Two tensors, or two sequences of tensors, equal within `tol` (relative and absolute)."""
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@torch.no_grad()
def probe(pipe, prompt: str = "a photo of sks ball"):
    """What a pipeline's trainable parts compute on fixed inputs, for any family: (text states,
    pooled embedding or None, denoiser output) for `prompt` padded to its full length (77
    tokens; T5's as the family says), a fixed noisy latent at timestep 500 and (SDXL) fixed
    time ids."""
    from train.data import tokenize

    family = families.get(families.of(pipe))
    ids = [tokenize(tokenizer, [prompt], family.TEXT_LENGTHS.get(name))[0]
           for (_, name), tokenizer in zip(family.TEXT, families.tokenizers(pipe))]
    states, pooled = family.encode_text(families.text_encoders(pipe), ids)
    denoiser = families.denoiser(pipe)
    latent = torch.randn(1, pipe.vae.config.latent_channels, 8, 8,
                         generator=torch.Generator().manual_seed(1))
    time_ids = torch.tensor([[48.0, 64, 0, 8, 64, 64]]) if family.TIME_IDS else None
    out = family.denoise(denoiser, latent, torch.tensor([500]), states, pooled, time_ids)
    return states, pooled, out
