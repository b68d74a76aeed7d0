"""CPU benchmark of the training step on the built-in `tiny` model (the figures in BENCHMARKS.md).

    python -m train.bench                 # 4 scenarios, ~2 min on 2 cores; prints a table
    python -m train.bench --repeat 3      # each scenario 3 times: medians, and the spread
    python -m train.bench --intake        # intake of 50 twelve-megapixel JPEGs from a ZIP
    python -m train.bench --formats       # size of each output format for full-size SD 1.5
    python -m train.bench --extract       # how much of a fine-tune extract_lora keeps, by rank

Each scenario runs in its own process (so peak memory is its own): a real `train.run` with one
instance and one class image per step, then the same UNet's forward and backward alone on
tensors of the same shapes. It reports the median step time, the process's peak RSS, and the
share of a step spent outside the model's forward and backward (data, noise, loss, optimizer,
clipping, bookkeeping). On a CPU compare the figures as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCENARIOS = [(64, False), (64, True), (128, False), (128, True)]


def measure(resolution: int, train_text_encoder: bool, steps: int) -> dict:
    """One scenario in this process: step time from a real run, then forward+backward alone."""
    import tarfile

    import torch

    from .config import TrainConfig
    from .example_data import write_example_zip
    from .models import build_builtin
    from .recipe import run

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_example_zip(Path(tmp) / "photos.zip", count=4, size=resolution)
        tar = run(TrainConfig(
            model="tiny", instance_data=str(photos), instance_prompt="a photo of sks ball",
            class_prompt="a photo of a ball", num_class_images=1, class_infer_steps=1,
            resolution=resolution, max_train_steps=steps, learning_rate=1e-5,
            train_text_encoder=train_text_encoder, output=str(Path(tmp) / "out.tar")),
            log=lambda _: None)
        with tarfile.open(tar) as t:
            history = json.load(t.extractfile("training.json"))["history"]
    times = [h["time"] for h in history]
    warm = steps // 5  # leave out the first steps: allocator and caches warm up
    step = statistics.median(b - a for a, b in zip(times[warm:], times[warm + 1:]))

    pipe = build_builtin("tiny")
    unet, text_encoder = pipe.unet.train(), pipe.text_encoder.train(train_text_encoder)
    text_encoder.requires_grad_(train_text_encoder)
    side = resolution // 8
    latents = torch.randn(2, 4, side, side)
    ids = pipe.tokenizer(["a photo of sks ball", "a photo of a ball"], padding="longest",
                         return_tensors="pt").input_ids
    frozen = text_encoder(ids)[0].detach()
    timesteps = torch.tensor([100, 700])
    model_times = []
    for i in range(warm + steps // 2):
        start = time.perf_counter()
        states = text_encoder(ids)[0] if train_text_encoder else frozen
        pred = unet(latents, timesteps, states).sample
        torch.nn.functional.mse_loss(pred, latents).backward()
        model_times.append(time.perf_counter() - start)
        unet.zero_grad(set_to_none=True)
        text_encoder.zero_grad(set_to_none=True)
    model = statistics.median(model_times[warm:])
    return {"resolution": resolution, "train_text_encoder": train_text_encoder,
            "step_s": round(step, 4), "forward_backward_s": round(model, 4),
            "outside_share": round(max(0.0, 1 - model / step), 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def measure_intake(count: int = 50, width: int = 4000, height: int = 3000,
                   resolution: int = 512) -> dict:
    """Seconds to take in `count` phone-sized JPEGs from a ZIP, against decoding each in full
    (what intake would cost without reduced-scale JPEG decoding)."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    from .intake import read_images

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photos.zip"
        gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        with zipfile.ZipFile(path, "w") as archive:
            for i in range(count):  # smooth scene plus sensor-like noise: a realistic JPEG size
                pixels = gradient + rng.normal(0, 12, (height, width, 3)).astype(np.float32)
                buffer = io.BytesIO()
                Image.fromarray(np.clip(pixels + i, 0, 255).astype(np.uint8)).save(
                    buffer, format="JPEG", quality=90)
                archive.writestr(f"DCIM/IMG_{i:04d}.jpg", buffer.getvalue())
        start = time.perf_counter()
        examples, _ = read_images(path, "instance_data", "a photo", resolution)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                image = Image.open(io.BytesIO(archive.read(name))).convert("RGB")
                image.resize((resolution * width // height, resolution), Image.Resampling.LANCZOS)
        full = time.perf_counter() - start
        return {"images": len(examples), "megapixels": width * height / 1e6,
                "zip_mib": round(path.stat().st_size / 2**20), "intake_s": round(ours, 2),
                "full_decode_s": round(full, 2), "images_per_s": round(len(examples) / ours, 1)}


def measure_formats() -> list[dict]:
    """MiB of each output format for `random-sd15` (SD 1.5's full size; no training needed:
    the sizes depend on shapes alone)."""
    import torch

    from .export import save_pipeline
    from .lora import add_lora, save_lora
    from .models import build_builtin
    from .single_file import save_single_file

    def mib(path: Path) -> float:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        return round(sum(p.stat().st_size for p in files) / 2**20, 1)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
            pipe = build_builtin("random-sd15")
            out = Path(tmp) / precision
            out.mkdir()
            save_single_file(pipe, out / "model.safetensors", dtype)
            rows.append({"format": "single_file", "precision": precision,
                         "mib": mib(out / "model.safetensors")})
            save_pipeline(pipe, out / "diffusers", dtype)
            rows.append({"format": "diffusers", "precision": precision,
                         "mib": mib(out / "diffusers")})
        for rank in (4, 16, 64):
            pipe = build_builtin("random-sd15")
            add_lora(pipe.unet, rank, rank, "unet")
            add_lora(pipe.text_encoder, rank, rank, "text_encoder")
            written = save_lora(pipe, Path(tmp) / f"lora{rank}", torch.float16)
            rows += [{"format": f"lora ({layout}, UNet + text encoder, rank {rank})",
                      "precision": "fp16", "mib": mib(path)} for layout, path in written.items()]
    return rows


def measure_extraction(steps: int, ranks=(1, 4, 8, 16, 32, 64)) -> list[dict]:
    """Train `tiny` (full fine-tune, text encoder frozen), then extract LoRAs of several ranks
    from the UNet's change and measure what each misses of it on fixed inputs."""
    import torch
    from safetensors.torch import load_file

    from .config import TrainConfig
    from .example_data import write_example_zip
    from .lora import (UNET_RESNET_TARGETS, UNET_TARGETS, extract_lora, extraction_error,
                       save_kohya)
    from .models import build_builtin
    from .recipe import run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = write_example_zip(tmp / "photos.zip", count=5, size=64)
        run(TrainConfig(instance_data=str(photos), instance_prompt="a photo of sks ball",
                        class_prompt="a photo of a ball", model="tiny", resolution=64,
                        num_class_images=5, class_infer_steps=5, max_train_steps=steps,
                        learning_rate=1e-4, train_text_encoder=False, save_precision="fp32",
                        output=str(tmp / "out.tar")), log=lambda _: None)
        import tarfile

        with tarfile.open(tmp / "out.tar") as tar:
            tar.extractall(tmp / "out", filter="data")
        pipe = build_builtin("tiny")
        base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        pipe.unet.load_state_dict(load_file(tmp / "out" / "unet" /
                                            "diffusion_pytorch_model.safetensors"))
        tuned = pipe.unet.eval()
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(4, 4, 8, 8, generator=g), torch.tensor([100, 300, 600, 900]),
                  torch.randn(4, 77, 32, generator=g))
        with torch.no_grad():
            full = tuned(*inputs)[0]
            rows = []
            for rank in ranks:
                lora = extract_lora(base, tuned, rank, "unet",
                                    targets=UNET_TARGETS + UNET_RESNET_TARGETS)
                save_kohya(lora, tmp / "lora.safetensors", torch.float16, "sd_v1", rank, rank)
                missed = extraction_error(base, tuned, lora, "unet", *inputs)
                change = (full - _with_base(tuned, base)(*inputs)[0]).norm() / full.norm()
                rows.append({"rank": rank, "missed_of_change": round(missed, 4),
                             "output_error": round(missed * float(change), 5),
                             "kib": round((tmp / "lora.safetensors").stat().st_size / 1024)})
    return rows


def _with_base(module, base: dict):
    import copy

    clone = copy.deepcopy(module)
    clone.load_state_dict(base)
    return clone


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__)
    parser.add_argument("--steps", type=int, default=100, help="training steps per scenario")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per scenario, each in its own process; medians are reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per run (default 1: tiny ops gain nothing from a "
                             "second thread, and one thread leaves the timings far steadier)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", nargs=2, metavar=("RESOLUTION", "TRAIN_TEXT_ENCODER"),
                        help=argparse.SUPPRESS)  # a single scenario, run in a child process
    parser.add_argument("--intake", action="store_true",
                        help="measure intake of 50 twelve-megapixel JPEGs instead")
    parser.add_argument("--formats", action="store_true",
                        help="measure the size of each output format for full-size SD 1.5")
    parser.add_argument("--extract", action="store_true",
                        help="measure extract_lora's error by rank after --steps of training")
    args = parser.parse_args()
    if args.formats:
        for row in measure_formats():
            print(json.dumps(row))
        return
    if args.extract:
        for row in measure_extraction(args.steps):
            print(json.dumps(row))
        return
    if args.intake:
        print(json.dumps(measure_intake()))
        return
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1] == "true", args.steps)))
        return
    results = []
    for resolution, text in SCENARIOS:
        runs = []
        for _ in range(args.repeat):
            child = subprocess.run([sys.executable, "-m", "train.bench", "--steps",
                                    str(args.steps), "--one", str(resolution), str(text).lower()],
                                   capture_output=True, text=True, check=True,
                                   env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        median = {key: statistics.median(r[key] for r in runs)
                  for key in ("step_s", "forward_backward_s", "outside_share", "peak_rss_mib")}
        shares = [r["outside_share"] for r in runs]
        results.append(dict(runs[0], **median, outside_range=[min(shares), max(shares)],
                            runs=runs))
    print(f"median of {args.repeat} runs of {args.steps} steps, {args.threads} thread(s); "
          f"outside share min-max in ()")
    print("| resolution | text encoder | s/step | fwd+bwd s | outside fwd+bwd | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        low, high = r["outside_range"]
        print(f"| {r['resolution']} | {'trained' if r['train_text_encoder'] else 'frozen'} | "
              f"{r['step_s']:.4f} | {r['forward_backward_s']:.4f} | "
              f"{100 * r['outside_share']:.0f} % ({100 * low:.0f}-{100 * high:.0f}) | "
              f"{r['peak_rss_mib']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
