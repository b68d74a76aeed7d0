"""Benchmarks behind BENCHMARKS.md: named scenarios (training step, class images, a whole run),
the CPU step table of `tiny`, intake, output formats, LoRA extraction.

    script/bench --list                   # the named scenarios
    script/bench --scenario tiny --json out.json   # one table (Markdown), and the rows as JSON
    script/bench --scenario sd15-bf16 --scenario sd15-fp16 ...   # on a GPU
    python -m bench --predict       # FLUX.1 and SD 3.5 Large: FLOPs and memory, no GPU needed
    python -m bench                 # 4 tiny step scenarios, ~2 min on 2 cores; a table
    python -m bench --repeat 3      # each scenario 3 times: medians, and the spread
    python -m bench --intake        # intake of 50 twelve-megapixel JPEGs from a ZIP
    python -m bench --formats       # size of each output format for full-size SD 1.5
    python -m bench --extract       # how much of a fine-tune extract_lora keeps, by rank
    python -m bench --samplers      # class images/s: DPM-Solver++ 25 against PNDM 50

Each scenario runs in its own process (so peak memory is its own): a real `train.run` with one
instance and one class image per step, then the same UNet's forward and backward alone on
tensors of the same shapes. It reports the median step time, the process's peak RSS, and the
share of a step spent outside the model's forward and backward (data, noise, loss, optimizer,
clipping, bookkeeping). On a CPU compare the figures as ratios within one run.

A named scenario (`--scenario`, repeatable) is a real `train.run` in its own process and reports:
the median step time after warm-up (synchronised: the loop reads each step's loss), steps/s,
peak memory (CUDA's max_memory_allocated, or the process's peak RSS on a CPU), the model FLOPs of
a step (counted once with torch.utils.flop_counter, on the meta device), the achieved TFLOP/s
and, on a known GPU, its fraction of the device's dense bf16/fp16 peak; class images per second;
and the run's phases as training.json times them. GPU scenarios (`sd15-*`) say "skipped: needs
CUDA" without one, and still report their FLOPs per step.
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

from .predict import predict, step_flops

SCENARIOS = [(64, False), (64, True), (128, False), (128, True)]

# Named scenarios (`--scenario NAME`): TrainConfig settings over SCENARIO_BASE, and where they run.
# Each is a real `train.run` in a process of its own, so its peak memory is its own. The `sd15-*`
# ones are SD 1.5's full size at 512 px (random weights: speed and memory are the real model's).
SCENARIO_BASE = dict(instance_prompt="a photo of sks ball", class_prompt="a photo of a ball",
                     learning_rate=1e-5, max_train_steps=100, sample_batch_size=4)
TINY_RUN = dict(model="tiny", resolution=64, num_class_images=8, train_text_encoder=False)
SD15_RUN = dict(model="random-sd15", resolution=512, num_class_images=8,
                train_text_encoder=False, mixed_precision="bf16")
NAMED = {
    "tiny": ("cpu", TINY_RUN, "tiny, 64 px, full fine-tune, text encoder frozen"),
    "tiny-text-encoder": ("cpu", dict(TINY_RUN, train_text_encoder=True),
                          "tiny with the text encoder trained"),
    "tiny-lora": ("cpu", dict(TINY_RUN, use_lora=True, learning_rate=1e-4), "tiny, LoRA rank 16"),
    "tiny-pndm-50": ("cpu", dict(TINY_RUN, class_scheduler="base", class_infer_steps=50),
                     "tiny with class images by the base sampler (PNDM) at 50 steps"),
    "sd15-bf16": ("cuda", SD15_RUN, "SD 1.5 size, 512 px, full fine-tune in bf16, text encoder "
                                    "frozen"),
    "sd15-fp16": ("cuda", dict(SD15_RUN, mixed_precision="fp16"), "as sd15-bf16, in fp16"),
    "sd15-bf16-checkpointing": ("cuda", dict(SD15_RUN, gradient_checkpointing=True),
                                "sd15-bf16 with gradient checkpointing"),
    "sd15-bf16-8bit-adam": ("cuda", dict(SD15_RUN, use_8bit_adam=True),
                            "sd15-bf16 with 8-bit AdamW"),
    "sd15-bf16-text-encoder": ("cuda", dict(SD15_RUN, train_text_encoder=True),
                               "sd15-bf16 with the text encoder trained"),
    "sd15-bf16-lora": ("cuda", dict(SD15_RUN, use_lora=True, learning_rate=1e-4),
                       "sd15-bf16, LoRA rank 16"),
    # The large flow transformers: LoRA rank 16 in bf16, the frozen base in bf16, gradient
    # checkpointing, embeddings cached and the text encoders parked (random weights, full size).
    **{f"{name}-lora-{side}": ("cuda", dict(
        model=f"random-{name}", resolution=side, num_class_images=8, train_text_encoder=False,
        use_lora=True, learning_rate=1e-4, mixed_precision="bf16", gradient_checkpointing=True),
        f"{about}, {side} px, LoRA rank 16 in bf16, gradient checkpointing")
       for name, about in (("flux-dev", "FLUX.1 [dev] size"), ("sd35-large", "SD 3.5 Large size"))
       for side in (512, 1024)},
    "flux2-klein-lora-1024": ("cuda", dict(
        model="random-flux2-klein", resolution=1024, num_class_images=8, train_text_encoder=False,
        use_lora=True, learning_rate=1e-4, mixed_precision="bf16", gradient_checkpointing=True),
        "FLUX.2 [klein] 4B size, 1024 px, LoRA rank 16 in bf16, gradient checkpointing"),
    "flux-dev-qlora-1024": ("cuda", dict(
        model="random-flux-dev", resolution=1024, num_class_images=8, train_text_encoder=False,
        use_lora=True, learning_rate=1e-4, mixed_precision="bf16", gradient_checkpointing=True,
        quantize_base="nf4"), "flux-dev-lora-1024 with the base's blocks in NF4 (24 GB cards)"),
    # A full fine-tune of FLUX.1 [dev] sharded across a node's 8 GPUs (predicted only: one GPU
    # cannot run it), the text encoders frozen and parked as for a LoRA.
    "flux-dev-full-fsdp-1024": ("cuda", dict(
        model="random-flux-dev", resolution=1024, num_class_images=8, train_text_encoder=False,
        learning_rate=1e-5, mixed_precision="bf16", gradient_checkpointing=True, fsdp=True),
        "FLUX.1 [dev] size, 1024 px, full fine-tune in bf16 sharded (fsdp) across 8 GPUs"),
    # The goal: a whole default run (800 steps, 200 class images) in under a minute.
    "sd15-default-run": ("cuda", dict(model="random-sd15", resolution=512, num_class_images=200,
                                      max_train_steps=800, learning_rate=None),
                         "a default run: 800 steps, 200 class images, text encoder trained"),
}
# Dense bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' spec sheets (H100 SXM: 989.4;
# about 790 is measured in practice), by a part of the device name; the first match wins.
DEVICE_PEAKS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0),
                ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0)]
PHASES = ["intake", "load_model", "class_images", "cache", "train", "export"]


def scenario_config(name: str, tmp: Path, steps: int | None = None,
                    class_images: int | None = None):
    """The TrainConfig of scenario `name`, its photos written into `tmp`."""
    from train.config import TrainConfig
    from train.example_data import write_example_zip

    device, overrides, _ = NAMED[name]
    settings = dict(SCENARIO_BASE, **overrides)
    if steps is not None and "max_train_steps" not in overrides:
        settings["max_train_steps"] = steps
    if class_images is not None:
        settings["num_class_images"] = class_images
    photos = write_example_zip(tmp / "photos.zip", count=4, size=settings["resolution"])
    return TrainConfig(instance_data=str(photos), output=str(tmp / "out.tar"), **settings)


def device_peak(name: str) -> float | None:
    """The dense bf16/fp16 peak TFLOP/s of a GPU by its name, if known."""
    return next((peak for part, peak in DEVICE_PEAKS if part in name), None)


def measure_scenario(name: str, steps: int | None = None,
                     class_images: int | None = None) -> dict:
    """Scenario `name` in this process: a real train.run, then its figures. Without CUDA a GPU
    scenario only counts its FLOPs and says it was skipped."""
    import tarfile

    import torch

    from train.recipe import run

    device, _, about = NAMED[name]
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        config = scenario_config(name, Path(tmp), steps, class_images)
        row = {"scenario": name, "about": about, "flops_per_step": step_flops(config)}
        if device == "cuda" and not cuda:
            return dict(row, skipped="needs CUDA")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        with tarfile.open(run(config, log=lambda _: None)) as t:
            record = json.load(t.extractfile("training.json"))
    # The loop copies each step's loss to the CPU, which waits for the GPU: the step times it
    # records are synchronised. The first fifth (at least one step) is warm-up.
    times = [h["time"] for h in record["history"]]
    warm = max(1, len(times) // 5)
    step = statistics.median(b - a for a, b in zip(times[warm:], times[warm + 1:]))
    timings = record["timings"]
    row.update(device=torch.cuda.get_device_name() if cuda else "cpu",
               mixed_precision=record["mixed_precision"], steps=len(times),
               step_s=round(step, 5), steps_per_s=round(1 / step, 2),
               tflops=float(f"{row['flops_per_step'] / step / 1e12:.3g}"),
               class_images=config.num_class_images,
               class_sampler=f"{config.class_scheduler} {config.class_infer_steps}",
               class_images_per_s=float(f"{config.num_class_images / timings['class_images']:.3g}"),
               phases=timings, total_s=round(sum(timings.values()), 2))
    if cuda:
        row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        row["peak_kind"] = "cuda max_memory_allocated"
        peak = device_peak(row["device"])
        row["device_peak_tflops"] = peak
        row["of_peak"] = round(row["tflops"] / peak, 4) if peak else None
    else:
        row["peak_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        row["peak_kind"] = "process peak RSS"
    return row


def run_scenarios(names: list[str], steps: int | None, class_images: int | None,
                  threads: int) -> list[dict]:
    """Each scenario in a child process; a GPU scenario without CUDA is skipped in this one."""
    import torch

    rows = []
    for name in names:
        if NAMED[name][0] == "cuda" and not torch.cuda.is_available():
            rows.append(measure_scenario(name, steps, class_images))
            print(f"{name}: skipped: needs CUDA", flush=True)
            continue
        command = [sys.executable, "-m", "bench", "--child", name]
        command += ["--steps", str(steps)] if steps is not None else []
        command += ["--class-images", str(class_images)] if class_images is not None else []
        env = dict(os.environ)
        if NAMED[name][0] == "cpu":  # see --threads
            env["OMP_NUM_THREADS"] = str(threads)
        child = subprocess.run(command, capture_output=True, text=True, env=env,
                               cwd=Path(__file__).resolve().parent.parent)
        if child.returncode:
            raise SystemExit(f"scenario {name} failed:\n{child.stderr[-3000:]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['step_s']:.4f} s/step", flush=True)
    return rows


def scenario_table(rows: list[dict]) -> list[str]:
    """The scenarios as one Markdown table."""
    header = ["scenario", "device", "s/step", "steps/s", "peak MiB", "GFLOP/step", "TFLOP/s",
              "of peak", "class images/s (sampler)", *(f"{p} s" for p in PHASES), "total s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        gflop = f"{r['flops_per_step'] / 1e9:.2f}"
        if r.get("skipped"):
            cells = [r["scenario"], f"skipped: {r['skipped']}", "", "", "", gflop]
        else:
            cells = [r["scenario"], r["device"], f"{r['step_s']:.4f}", f"{r['steps_per_s']:.1f}",
                     str(r["peak_mib"]), gflop, f"{r['tflops']:.4f}",
                     f"{100 * r['of_peak']:.1f} %" if r.get("of_peak") else "-",
                     f"{r['class_images_per_s']:.2f} ({r['class_sampler']})",
                     *(f"{r['phases'].get(p, 0):.2f}" for p in PHASES), f"{r['total_s']:.2f}"]
        cells += [""] * (len(header) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return lines



def measure(resolution: int, train_text_encoder: bool, steps: int) -> dict:
    """One scenario in this process: step time from a real run, then forward+backward alone."""
    import tarfile

    import torch

    from train.config import TrainConfig
    from train.example_data import write_example_zip
    from train.models import build_builtin
    from train.recipe import run

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


def measure_samplers(model: str = "tiny", resolution: int = 64, count: int = 8,
                     repeats: int = 5, batch_size: int = 4) -> list[dict]:
    """Class images per second of each sampler at its steps (class_scheduler, class_infer_steps),
    the runs interleaved in one process and the best of `repeats` kept (on a shared machine the
    fastest run is the one least slowed by others). Also the process CPU seconds per image."""
    import torch

    from train.models import build_builtin
    from train.sampling import generate, sampler

    pipe = build_builtin(model, "cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    choices = [("dpm++", 25), ("base", 50), ("dpm++", 50)]
    wall, cpu = {c: [] for c in choices}, {c: [] for c in choices}
    for _ in range(repeats):
        for name, steps in choices:
            start, start_cpu = time.perf_counter(), time.process_time()
            generate(pipe, "a photo of a ball", count, batch_size=batch_size, steps=steps,
                     guidance=7.5, seed=0, resolution=resolution,
                     scheduler=sampler(pipe, name), log=lambda _: None)
            wall[name, steps].append(time.perf_counter() - start)
            cpu[name, steps].append(time.process_time() - start_cpu)
    # Three significant digits: a rate rounded to fixed decimals reads 0 on a busy machine.
    return [{"sampler": name, "steps": steps,
             "images_per_s": float(f"{count / min(wall[name, steps]):.3g}"),
             "cpu_s_per_image": float(f"{min(cpu[name, steps]) / count:.3g}")}
            for name, steps in choices]


def measure_intake(count: int = 50, width: int = 4000, height: int = 3000,
                   resolution: int = 512) -> dict:
    """Seconds to take in `count` phone-sized JPEGs from a ZIP, against decoding each in full
    (what intake would cost without reduced-scale JPEG decoding)."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    from train.intake import read_images

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

    from train.export import save_pipeline
    from train.lora import add_lora, save_lora
    from train.models import build_builtin
    from train.single_file import save_single_file

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

    from train.config import TrainConfig
    from train.example_data import write_example_zip
    from train.lora import (UNET_RESNET_TARGETS, UNET_TARGETS, extract_lora, extraction_error,
                       save_kohya)
    from train.models import build_builtin
    from train.recipe import run

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=list(NAMED), metavar="NAME",
                        help="run this named scenario (repeatable; --list names them)")
    parser.add_argument("--list", action="store_true", help="list the named scenarios")
    parser.add_argument("--class-images", type=int,
                        help="class images to generate in a named scenario (default: its own)")
    parser.add_argument("--child", choices=list(NAMED), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help="training steps per scenario (default 100)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per scenario, each in its own process; medians are reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per run (default 1: tiny ops gain nothing from a "
                             "second thread, and one thread leaves the timings far steadier)")
    parser.add_argument("--predict", nargs="*", metavar="NAME",
                        help="predict the FLOPs and GPU memory of a step on the meta device, for "
                             "the named scenarios (default: the large-model ones); no GPU needed")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", nargs=2, metavar=("RESOLUTION", "TRAIN_TEXT_ENCODER"),
                        help=argparse.SUPPRESS)  # a single scenario, run in a child process
    parser.add_argument("--intake", action="store_true",
                        help="measure intake of 50 twelve-megapixel JPEGs instead")
    parser.add_argument("--formats", action="store_true",
                        help="measure the size of each output format for full-size SD 1.5")
    parser.add_argument("--samplers", action="store_true",
                        help="measure class images/s of DPM-Solver++ 25 steps against PNDM 50")
    parser.add_argument("--extract", action="store_true",
                        help="measure extract_lora's error by rank after --steps of training")
    args = parser.parse_args(argv)
    if args.list:
        for name, (device, _, about) in NAMED.items():
            print(f"{name:24} {device:4}  {about}")
        return
    if args.predict is not None:
        names = args.predict or [n for n in NAMED if n.startswith(("flux", "sd35"))]
        rows = []
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(dict(scenario=name, **predict(scenario_config(name, Path(tmp)))))
            print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return
    if args.child:  # one named scenario, in a child process
        print(json.dumps(measure_scenario(args.child, args.steps, args.class_images)))
        return
    if args.scenario:
        rows = run_scenarios(args.scenario, args.steps, args.class_images, args.threads)
        print("\n".join(scenario_table(rows)))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return
    args.steps = args.steps or 100
    if args.samplers:
        for row in measure_samplers(repeats=args.repeat if args.repeat > 1 else 5):
            print(json.dumps(row))
        return
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
            child = subprocess.run([sys.executable, "-m", "bench", "--steps",
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

