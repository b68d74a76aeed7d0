"""The quickstart's two ends on `toy`: photos of a subject the model never saw, and a contact sheet
that shows what DreamBooth made of them. script/quickstart runs the trainer in between:

    python -m toy.quickstart photos example/toy-photos          # 5 photos, captions beside them
    python -m train --model toy --instance-data example/toy-photos ... --output example/toy.tar
    python -m toy.quickstart sheet example/toy.tar example/toy-photos example/toy-contact-sheet.png
    python -m toy.quickstart compare photos/ both.png default=a.tar chosen=b.tar  # a row each

The subject is the world's white circle with a black core (toy/world.py), photographed on green,
blue and yellow. The sheet's rows: the photos; the trained model drawing `a photo of sks circle
on a ... background` on each photographed background and on red, where the subject was never
photographed; then the plain class, `a photo of a circle`, which should still be the model's own
circles (prior preservation), not the subject. Captions under each row say what it should show.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

from train.quiet import quiet_libraries

from . import bench, world

PER_ROW = 6  # samples in each row of the sheet


def write_photos(folder: Path) -> Path:
    """The subject's photos (PNG, each with a caption .txt naming its background)."""
    bench.write_instance_data(folder, seed=0)
    return folder


def sheet(trained: Path, photos: Path, out: Path, seed: int = 0) -> Path:
    """Load the trained output (a tarball or its folder) and draw the contact sheet into `out`."""
    return compare({"": trained}, photos, out, seed)


def compare(models: dict[str, Path], photos: Path, out: Path, seed: int = 0) -> Path:
    """The contact sheet of one or more trained outputs (label -> tarball or folder): the
    photos, then for each background and for the plain class a row per model, the same seeds
    in every model's row; with several models, also a row each of world prompts (held-out
    combinations, one a sample)."""
    import tarfile

    from train.evaluate import contact_sheet, load_trained

    prompts = [(world.caption(world.SUBJECT["shape"], None, background,
                              identifier=bench.IDENTIFIER),
                "never photographed there" if background == world.SUBJECT_NEW_BACKGROUND
                else "photographed there")
               for background in (*world.SUBJECT_BACKGROUNDS, world.SUBJECT_NEW_BACKGROUND)]
    prompts.append((bench.CLASS_PROMPT, "the plain class: the model's own circles"))
    # The rest of the world: one held-out combination a sample, never drawn in pretraining.
    world_prompts = [world.caption(*combination)
                     for combination in sorted(world.HELD_OUT)[::2][:PER_ROW]]
    rows = [("the photos (green, blue, yellow backgrounds)",
             [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))])]
    drawn = {}
    for label, trained in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = trained
            if trained.is_file():
                with tarfile.open(trained) as tar:
                    tar.extractall(tmp, filter="data")
                folder = Path(tmp)
            pipe = load_trained(folder, "toy", "cpu")
            # the plain class at seed + 10, as the sheets drawn before it was a row of its own
            drawn[label] = [bench.sample(pipe, [prompt] * PER_ROW,
                                         seed + (k if k < len(prompts) - 1 else 10))
                            for k, (prompt, _) in enumerate(prompts)]
            if len(models) > 1:
                drawn[label].append(bench.sample(pipe, world_prompts, seed + 20))
    if len(models) > 1:
        prompts.append(("the world: " + "; ".join(p.removeprefix("a photo of a ")
                                                  for p in world_prompts), "held out"))
    for k, (prompt, note) in enumerate(prompts):
        for label, images in drawn.items():
            rows.append((f"{label + ': ' if label else ''}{prompt}  ({note})", images[k]))
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows, thumb=96).save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toy.quickstart",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    photos = commands.add_parser("photos", help="write the subject's photos into a folder")
    photos.add_argument("folder", type=Path)
    drawn = commands.add_parser("sheet", help="draw the trained model's contact sheet")
    drawn.add_argument("trained", type=Path, help="the trainer's output tarball (or folder)")
    drawn.add_argument("photos", type=Path, help="the photos it was trained on")
    drawn.add_argument("out", type=Path, help="the PNG to write")
    both = commands.add_parser("compare", help="one sheet of several trained models, a row "
                                               "per model for each prompt")
    both.add_argument("photos", type=Path, help="the photos they were trained on")
    both.add_argument("out", type=Path, help="the PNG to write")
    both.add_argument("models", nargs="+", metavar="LABEL=TARBALL",
                      help="each trained output and its label, e.g. default=default.tar")
    args = parser.parse_args(argv)
    quiet_libraries(loading=True)
    if args.command == "photos":
        print(f"photos: {write_photos(args.folder)} ({bench.INSTANCE_IMAGES} photos of the "
              f"subject, a white circle with a black core, on green, blue and yellow)")
    elif args.command == "sheet":
        print(f"contact sheet: {sheet(args.trained, args.photos, args.out)}")
    else:
        models = {label: Path(tar) for label, tar in (m.split("=", 1) for m in args.models)}
        print(f"contact sheet: {compare(models, args.photos, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
