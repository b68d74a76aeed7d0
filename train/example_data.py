"""Example photos made in code: a ZIP of a made-up subject to try the trainer without your own.

    python -m train.example_data example.zip            # 5 photos, 256 px
    python -m train.example_data example.zip --count 8 --size 512

The subject is a red-and-yellow striped ball with a white dot, drawn at varied places and sizes
on varied backgrounds, saved as JPEGs in a nested folder, as a phone export might be.
"""

from __future__ import annotations

import argparse
import io
import random
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw


def subject_photo(rng: random.Random, size: int) -> Image.Image:
    """One photo of the subject on a random soft background."""
    background = tuple(rng.randint(40, 220) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # some background clutter, so no two photos are alike
        x, y = rng.randrange(size), rng.randrange(size)
        r = rng.randint(size // 16, size // 5)
        shade = tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in background)
        draw.rectangle((x - r, y - r, x + r, y + r), fill=shade)
    radius = rng.randint(size // 6, size // 3)
    cx, cy = (rng.randint(radius, size - radius) for _ in range(2))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    ball = Image.new("RGB", image.size, (200, 30, 30))
    stripes = ImageDraw.Draw(ball)
    for band in range(cy - radius, cy + radius, max(2, radius // 3)):  # yellow stripes
        stripes.rectangle((0, band, size, band + max(1, radius // 8)), fill=(240, 200, 40))
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    image.paste(ball, (0, 0), mask)
    dot = max(2, radius // 5)
    draw.ellipse((cx - dot, cy - dot, cx + dot, cy + dot), fill=(255, 255, 255))
    return image


def write_example_zip(path: str | Path, count: int = 5, size: int = 256, seed: int = 0) -> Path:
    """Write `count` subject photos into a ZIP at `path` (in `photos/`)."""
    rng = random.Random(seed)
    path = Path(path)
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            buffer = io.BytesIO()
            subject_photo(rng, size).save(buffer, format="JPEG", quality=90)
            archive.writestr(f"photos/IMG_{i + 1:04d}.jpg", buffer.getvalue())
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m train.example_data",
                                     description="Write a ZIP of example subject photos.")
    parser.add_argument("output", help="path of the ZIP to write")
    parser.add_argument("--count", type=int, default=5, help="number of photos (default 5)")
    parser.add_argument("--size", type=int, default=256, help="pixels per side (default 256)")
    args = parser.parse_args()
    print(f"wrote {write_example_zip(args.output, args.count, args.size)} "
          f"({args.count} photos, {args.size} px)")
