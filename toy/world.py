"""The toy world: coloured shapes on coloured backgrounds, generated in code, with captions.

A world small enough that a Stable-Diffusion-shaped model can learn it on a CPU and that scorers
can judge exactly (toy/score.py), so that the DreamBooth recipe can be measured for real
(toy/pretrain.py pretrains `toy` on it; toy/bench.py and QUALITY.md measure
DreamBooth on that).

    python -m toy.world out/ --count 16      # write 16 scenes and their captions

A scene is an upright shape (circle, square, triangle or star) of one palette colour, of random
size and position, on a background of another palette colour, at 64 x 64 pixels drawn in
2 x 2 blocks (PIXEL):

    a photo of a red star on a blue background

Captions also come shorter (`a photo of a star on a blue background`, `a photo of a red star`,
`a photo of a star`), so that prompts which leave an attribute out mean "any". A few
(shape, colour, background) combinations are never drawn for pretraining (HELD_OUT), to test
whether the model composes attributes or only memorised the combinations it saw.

The DreamBooth subject is drawn here too: a white circle with a black core (an eye), a look the
world never shows (every world shape is one flat colour). So are collages, images of several
shapes over each other that no caption describes, for training the autoencoder alone.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star")
PALETTE = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
           "yellow": (240, 210, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
COLOURS = tuple(PALETTE)
# Never drawn for pretraining: per shape, three (colour, background) pairs, chosen so every
# shape, colour and background (and each pair of them) still appears in other scenes.
HELD_OUT = frozenset({
    ("circle", "green", "yellow"), ("circle", "white", "blue"), ("circle", "black", "red"),
    ("square", "red", "white"), ("square", "yellow", "green"), ("square", "blue", "black"),
    ("triangle", "white", "red"), ("triangle", "black", "yellow"), ("triangle", "green", "blue"),
    ("star", "yellow", "black"), ("star", "blue", "white"), ("star", "red", "green"),
})
# The DreamBooth subject: its class, its colours, the core's radius as a share of the shape's.
# (Chosen over a red circle with a white core, which the toy autoencoder reconstructs badly on
# blue and green backgrounds: a subject it cannot encode could not be learned by any recipe.)
SUBJECT = {"shape": "circle", "colour": "white", "core": "black", "core_ratio": 0.5}
# Backgrounds the subject's photos are taken on; SUBJECT_NEW_BACKGROUND it is never shown on.
SUBJECT_BACKGROUNDS = ("green", "blue", "yellow")
SUBJECT_NEW_BACKGROUND = "red"
# How often pretraining uses each of caption_forms(): all attributes half the time.
CAPTION_SHARES = (0.5, 0.25, 0.15, 0.1)
# Radius range (pixels, centre to corner/edge) and the margin kept clear at the border, so the
# border shows the background only.
RADIUS = (12, 24)
MARGIN = 3
# Scenes are drawn on a grid of PIXEL x PIXEL blocks (32 x 32 cells at 64 px). The toy
# autoencoder's 4x latents then hold a scene as plainly as a 2x one holds a 32 px image: with
# detail at every one of the 64 pixels, its latents were a dense code that the toy UNet had not
# learned to draw after 70 minutes (shapes came out as blobs), while a 32 px world was learned
# in 30 (when this world was built). 64 px remains the size of every image, as `resolution` needs.
PIXEL = 2


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    radius: float
    cx: float
    cy: float
    subject: bool = False  # the bullseye: the shape's core in SUBJECT["core"]


def caption(scene_or_shape, colour: str | None = None, background: str | None = None,
            identifier: str | None = None) -> str:
    """The world's caption: `a photo of a [colour] shape [on a background background]`; with
    an identifier, `a photo of sks shape ...` (DreamBooth's form, no colour: the identifier
    carries it). Pass a Scene, or a shape with the attributes to name (None leaves one out)."""
    shape = scene_or_shape.shape if isinstance(scene_or_shape, Scene) else scene_or_shape
    if identifier:
        words = ["a photo of", identifier, shape]
    else:
        words = ["a photo of a"] + ([colour] if colour else []) + [shape]
    if background:
        words += ["on a", background, "background"]
    return " ".join(words)


def random_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None,
                 background: str | None = None, held_out: str = "exclude") -> Scene:
    """A scene with the given attributes and the rest drawn at random. `held_out`: "exclude"
    (never a HELD_OUT combination; pretraining), "only" (only those) or "any"."""
    while True:
        s = shape or SHAPES[rng.integers(len(SHAPES))]
        c = colour or COLOURS[rng.integers(len(COLOURS))]
        b = background or COLOURS[rng.integers(len(COLOURS))]
        if c == b:
            if colour and background:
                raise ValueError(f"shape colour and background are both {c}")
            continue
        combo_held = (s, c, b) in HELD_OUT
        if (held_out == "exclude" and combo_held) or (held_out == "only" and not combo_held):
            if shape and colour and background:
                raise ValueError(f"{(s, c, b)} is {'' if combo_held else 'not '}held out")
            continue
        break
    return _placed(rng, s, c, b, subject=False)


def subject_scene(rng: np.random.Generator, background: str) -> Scene:
    """The DreamBooth subject at a random size and place on `background`."""
    return _placed(rng, SUBJECT["shape"], SUBJECT["colour"], background, subject=True)


def _placed(rng, shape, colour, background, subject) -> Scene:
    radius = float(rng.uniform(*RADIUS))
    lo, hi = radius + MARGIN, SIZE - radius - MARGIN
    return Scene(shape, colour, background, radius, float(rng.uniform(lo, hi)),
                 float(rng.uniform(lo, hi)), subject)


def outline(shape: str, radius: float, cx: float, cy: float) -> list[tuple]:
    """The polygon of an upright square, triangle or star: vertices at `radius` from the centre.
    Upright, not rotated at random: with random rotations the toy UNet drew every polygon as a
    blob (shape right in ~60 % of samples after 3 000 steps, while colours and backgrounds were
    right in 100 %); a world with rotations would need a bigger model than 30 CPU minutes train."""
    if shape == "square":
        n, radii, start = 4, [radius], math.pi / 4  # sides level with the image's
    elif shape == "triangle":
        n, radii, start = 3, [radius], -math.pi / 2  # a point at the top
    elif shape == "star":
        n, radii, start = 10, [radius, radius * 0.45], -math.pi / 2  # 5 points, one at the top
    else:
        raise ValueError(f"no polygon for {shape!r}")
    return [(cx + radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / n),
             cy + radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / n))
            for i in range(n)]


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image, hard-edged (every pixel a palette colour), `size` pixels
    square, drawn on cells of PIXEL x PIXEL pixels (coordinates are for SIZE, scaled)."""
    image, draw, k = _canvas(scene.background, size)
    r, cx, cy = scene.radius * k, scene.cx * k, scene.cy * k
    _draw_shape(draw, scene.shape, scene.colour, r, cx, cy)
    if scene.subject:
        _draw_shape(draw, "circle", SUBJECT["core"], r * SUBJECT["core_ratio"], cx, cy)
    return image.resize((size, size), Image.NEAREST)


def render_array(scenes: list[Scene], size: int = SIZE) -> np.ndarray:
    """Scenes as one uint8 array [n, size, size, 3]."""
    return np.stack([np.asarray(render(s, size)) for s in scenes])


def collage(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """An image that is no scene: 2-4 shapes of any class, colour and size (radius 3-24 px),
    overlapping at random, on a random background. For the autoencoder only, which must draw
    images the world's captions never describe (shapes on or inside other shapes, such as the
    DreamBooth subject) as Stable Diffusion's autoencoder draws any photo; trained on scenes
    alone, it drew a black core inside a white circle on green as green."""
    image, draw, k = _canvas(COLOURS[rng.integers(len(COLOURS))], size)
    for _ in range(rng.integers(2, 5)):
        r = float(rng.uniform(3, RADIUS[1]))
        cx, cy = rng.uniform(0, SIZE, 2)
        _draw_shape(draw, SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))],
                    r * k, cx * k, cy * k)
    return image.resize((size, size), Image.NEAREST)


def _canvas(background: str, size: int):
    cells = size // PIXEL
    image = Image.new("RGB", (cells, cells), PALETTE[background])
    return image, ImageDraw.Draw(image), cells / SIZE


def _draw_shape(draw, shape: str, colour: str, r: float, cx: float, cy: float) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=PALETTE[colour])
    else:
        draw.polygon(outline(shape, r, cx, cy), fill=PALETTE[colour])


def caption_forms(scene: Scene) -> list[str]:
    """The scene's captions for pretraining, in the order of CAPTION_SHARES: every attribute,
    no colour, no background, the shape alone (so that shorter prompts work and mean "any").
    Caption dropout (the empty caption, for classifier-free guidance) is the trainer's job."""
    return [caption(scene.shape, scene.colour, scene.background),
            caption(scene.shape, None, scene.background),
            caption(scene.shape, scene.colour, None), caption(scene.shape)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toy.world",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write PNGs and captions.txt into")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subject", action="store_true", help="draw the DreamBooth subject")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(args.count):
        if args.subject:
            scene = subject_scene(rng, SUBJECT_BACKGROUNDS[i % len(SUBJECT_BACKGROUNDS)])
            text = caption(scene.shape, None, scene.background, identifier="sks")
        else:
            scene = random_scene(rng)
            text = caption(scene.shape, scene.colour, scene.background)
        render(scene).save(out / f"{i:04d}.png")
        lines.append(f"{i:04d}.png\t{text}")
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.count} scenes to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
