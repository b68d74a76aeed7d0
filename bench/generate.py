"""The generator's cold start and per-image time, per family and kind of weights: what a trained
version pays once (unpack the tarball, load it, draw the first image) and then per image.

    .venv/bin/python -m bench.generate                        # tiny, tiny-sd2, tiny-sdxl on CPU
    .venv/bin/python -m bench.generate --models random-sd15 --size 512   # a GPU: SD 1.5's size

Each model is trained for one step (no prior preservation) into a tarball of full weights and
one of LoRA weights: how long drawing takes does not depend on what the weights learned. The
download is left out (bench/download.py measures it); everything after it is timed as
generate.py runs it: train.generate.Generator, then draw() one image at a time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from train import TrainConfig, run
from train.example_data import write_example_zip
from train.generate import GenerateConfig, Generator, draw
from train.quiet import quiet_libraries


def tarball(model: str, kind: str, folder: Path, photos: Path, size: int) -> Path:
    """A trainer's tarball of `kind` (full or lora) for `model`, after one training step."""
    output = folder / f"{model}-{kind}.tar"
    run(TrainConfig(instance_data=str(photos), instance_prompt="a photo of sks ball",
                    with_prior_preservation=False, model=model, resolution=size,
                    max_train_steps=1, use_lora=kind == "lora", output=str(output),
                    work_dir=str(folder)), log=lambda line: None)
    return output


def measure(model: str, kind: str, *, images: int, size: int, steps: int, folder: Path,
            photos: Path) -> dict:
    """Seconds to unpack, load and draw the first image (the cold start), then per image."""
    weights = tarball(model, kind, folder, photos, size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = GenerateConfig(prompt="a photo of sks ball on the beach", width=size, height=size,
                            num_inference_steps=steps, seed=0)
    clock = time.perf_counter()
    generator = Generator(model, device, folder / f"work-{model}-{kind}", 1 << 40,
                          log=lambda line: None)
    unpacked = generator.unpacked(kind, weights, "weights", weights.name)
    unpack = time.perf_counter() - clock
    pipe = generator.pipeline(kind, unpacked, "weights", weights.name)
    _sync(device)
    load = time.perf_counter() - clock - unpack
    draw(pipe, config, log=lambda line: None)
    _sync(device)
    cold = time.perf_counter() - clock
    times = []
    for _ in range(images):
        started = time.perf_counter()
        draw(pipe, config, log=lambda line: None)
        _sync(device)
        times.append(time.perf_counter() - started)
    return {"model": model, "weights": kind, "device": device, "size": size, "steps": steps,
            "tarball_mib": weights.stat().st_size / 2**20, "unpack_s": unpack, "load_s": load,
            "first_image_s": cold - unpack - load, "cold_s": cold,
            "per_image_s": statistics.median(times)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,tiny-sd2,tiny-sdxl")
    parser.add_argument("--weights", default="full,lora", help="full, lora or both")
    parser.add_argument("--images", type=int, default=5, help="images timed after the first")
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels")
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps per image")
    args = parser.parse_args(argv)
    quiet_libraries(loading=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photos = write_example_zip(folder / "photos.zip", count=4, size=args.size)
        print("model       weights  tarball   unpack    load  first image   cold   per image")
        for model in args.models.split(","):
            for kind in args.weights.split(","):
                row = measure(model, kind, images=args.images, size=args.size,
                              steps=args.steps, folder=folder, photos=photos)
                print(f"{model:11} {kind:7} {row['tarball_mib']:6.1f} MiB {row['unpack_s']:6.2f}s"
                      f" {row['load_s']:6.2f}s {row['first_image_s']:9.2f}s "
                      f"{row['cold_s']:6.2f}s {row['per_image_s']:8.3f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
