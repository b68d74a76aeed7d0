"""Scorers for the toy world (toy/world.py): what an image shows, read back from its pixels.

    python -m toy.score --train      # retrain the shape classifier (~2 min on 2 cores)
    python -m toy.score --check      # its accuracy on fresh, degraded scenes

For any RGB image (a rendered scene, or a sample from a model of the world):

  background   the palette colour nearest to most border pixels
  colour       the most common palette colour among the shape's pixels (the shape is what is
               not background connected to the border, holes filled)
  shape        circle, square, triangle or star: a small CNN on the shape's silhouette (so it
               ignores colour), trained on world scenes blurred and noised like samples are;
               its weights ship as toy/scorer.safetensors (~350 KB)
  is_subject   the DreamBooth subject (world.SUBJECT): a circle whose core is the core colour
               and whose rim is the subject's colour

`score(images)` returns one dict per image with all four. tests/test_toyworld.py checks them on
fresh scenes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import world

WEIGHTS = Path(__file__).resolve().parent / "scorer.safetensors"
PALETTE = torch.tensor([world.PALETTE[c] for c in world.COLOURS], dtype=torch.float32)
SIL = 32  # silhouettes are classified at 32 x 32


def as_array(images) -> np.ndarray:
    """PIL images (any size, resized to 64) or a uint8 array -> uint8 [n, 64, 64, 3]."""
    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(im.convert("RGB").resize((world.SIZE, world.SIZE),
                                                         Image.BILINEAR)) for im in images])


def palette_index(images: np.ndarray) -> torch.Tensor:
    """Each pixel's nearest palette colour (index into world.COLOURS): [n, h, w]."""
    x = torch.from_numpy(images).float()
    return ((x[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)


def backgrounds(index: torch.Tensor) -> torch.Tensor:
    """The majority palette colour of the two-pixel border: [n]."""
    border = torch.ones(index.shape[1:], dtype=torch.bool)
    border[2:-2, 2:-2] = False
    return torch.stack([torch.bincount(i[border], minlength=len(PALETTE)).argmax()
                        for i in index])


def shape_masks(index: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """The shape of each image: pixels not reachable from the border through background
    pixels (so a hole in the background colour counts as shape). Float [n, h, w]."""
    is_bg = (index == bg[:, None, None]).float()[:, None]
    reach = torch.zeros_like(is_bg)
    reach[..., 0, :] = reach[..., -1, :] = reach[..., :, 0] = reach[..., :, -1] = 1
    reach = reach * is_bg
    for _ in range(index.shape[-1] * 2):  # a flood fill, one pixel further each round
        grown = F.max_pool2d(reach, 3, 1, 1) * is_bg
        if torch.equal(grown, reach):
            break
        reach = grown
    return 1 - reach[:, 0]


def shape_colours(index: torch.Tensor, masks: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """The most common non-background palette colour inside each mask: [n]."""
    out = []
    for i, m, b in zip(index, masks, bg):
        counts = torch.bincount(i[m > 0], minlength=len(PALETTE))
        counts[b] = 0
        out.append(counts.argmax())
    return torch.stack(out)


def classifier() -> torch.nn.Sequential:
    """The silhouette classifier: 1 x 32 x 32 -> one logit per shape."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, len(world.SHAPES)))


_MODEL: dict = {}


def load_classifier(path: Path = WEIGHTS) -> torch.nn.Sequential:
    if path not in _MODEL:
        from safetensors.torch import load_file

        model = classifier()
        model.load_state_dict(load_file(path))
        _MODEL[path] = model.eval()
    return _MODEL[path]


def silhouettes(masks: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(masks[:, None], world.SIZE // SIL)


def score(images, model: torch.nn.Module | None = None) -> list[dict]:
    """What each image shows: {"shape", "colour", "background", "subject"}."""
    x = as_array(images)
    index = palette_index(x)
    bg = backgrounds(index)
    masks = shape_masks(index, bg)
    colour = shape_colours(index, masks, bg)
    with torch.no_grad():
        shape = (model or load_classifier())(silhouettes(masks)).argmax(-1)
    subject = subject_flags(index, masks, shape)
    return [{"shape": world.SHAPES[s], "colour": world.COLOURS[c],
             "background": world.COLOURS[b], "subject": bool(f)}
            for s, c, b, f in zip(shape.tolist(), colour.tolist(), bg.tolist(), subject)]


def subject_flags(index: torch.Tensor, masks: torch.Tensor, shape: torch.Tensor) -> list[bool]:
    """Whether each image shows the subject: a circle whose core (within 0.3 of its radius of
    the centre) is mostly the core colour and whose rim (0.75 to 0.95 of the radius) is mostly
    the subject's colour. World shapes are one flat colour, so they never pass both."""
    core_c = world.COLOURS.index(world.SUBJECT["core"])
    rim_c = world.COLOURS.index(world.SUBJECT["colour"])
    ys, xs = torch.meshgrid(torch.arange(index.shape[1]), torch.arange(index.shape[2]),
                            indexing="ij")
    flags = []
    for i, m, s in zip(index, masks, shape.tolist()):
        area = m.sum()
        if world.SHAPES[s] != world.SUBJECT["shape"] or area < 20:
            flags.append(False)
            continue
        cy, cx = (ys * m).sum() / area, (xs * m).sum() / area
        radius = (area / np.pi).sqrt()
        d = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt() / radius
        core, rim = i[d <= 0.3], i[(d >= 0.75) & (d <= 0.95) & (m > 0)]
        flags.append(bool(len(core) and len(rim) and (core == core_c).float().mean() >= 0.5
                          and (rim == rim_c).float().mean() >= 0.5))
    return flags


def degrade(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur and noise like a diffusion model's samples: what the classifier trains on."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    sigma = float(rng.uniform(0.0, 2.2))  # samples can be as soft as a sigma-2 blur
    if sigma > 0.2:
        r = torch.arange(-3, 4, dtype=torch.float32)
        k = torch.exp(-r ** 2 / (2 * sigma ** 2))
        k = k / k.sum()
        x = F.conv2d(F.pad(x.reshape(-1, 1, *x.shape[2:]), (3, 3, 3, 3), mode="replicate"),
                     (k[:, None] * k[None, :])[None, None]).reshape(x.shape)
    x = x + torch.from_numpy(rng.normal(0, rng.uniform(0, 20), x.shape)).float()
    return x.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def world_batch(rng: np.random.Generator, n: int, degraded: bool = True
                ) -> tuple[np.ndarray, list[world.Scene]]:
    """`n` world scenes (any combination) with a few subjects, and their images."""
    scenes = [world.subject_scene(rng, world.COLOURS[rng.integers(len(world.COLOURS))])
              if rng.random() < 0.1 else world.random_scene(rng, held_out="any")
              for _ in range(n)]
    scenes = [s if s.background != world.SUBJECT["colour"] or not s.subject
              else world.subject_scene(rng, "blue") for s in scenes]
    images = world.render_array(scenes)
    return (degrade(images, rng) if degraded else images), scenes


def train_classifier(steps: int = 1500, batch: int = 64, seed: int = 0, log=print):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        images, scenes = world_batch(rng, batch)
        index = palette_index(images)
        # Plain non-background masks: the same as shape_masks' on world scenes (no holes), and
        # many times faster than its flood fill.
        masks = (index != backgrounds(index)[:, None, None]).float()
        target = torch.tensor([world.SHAPES.index(s.shape) for s in scenes])
        loss = F.cross_entropy(model(silhouettes(masks)), target)
        for group in opt.param_groups:  # cosine decay: the last steps settle the near-ties
            group["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"classifier {step}/{steps}  loss {loss.item():.4f}  "
                f"{time.perf_counter() - start:.0f}s")
    return model.eval()


def accuracy(n: int = 2000, seed: int = 123, degraded: bool = True,
             model: torch.nn.Module | None = None) -> dict:
    """Share of fresh scenes on which each scorer is right."""
    images, scenes = world_batch(np.random.default_rng(seed), n, degraded)
    got = score(images, model)
    return {key: float(np.mean([g[key] == (s.subject if key == "subject" else
                                           getattr(s, key)) for g, s in zip(got, scenes)]))
            for key in ("shape", "colour", "background", "subject")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toy.score",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help=f"retrain, write {WEIGHTS.name}")
    parser.add_argument("--check", action="store_true", help="report accuracy")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.train:
        from safetensors.torch import save_file

        model = train_classifier()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, WEIGHTS)
        _MODEL.clear()
        print(f"wrote {WEIGHTS}")
    if args.check or args.train:
        print("degraded:", accuracy(degraded=True))
        print("clean:   ", accuracy(degraded=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
