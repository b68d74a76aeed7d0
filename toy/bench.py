"""DreamBooth quality benchmark in the toy world: does the product's recipe learn a subject?

    nice -n 10 python -m toy.bench --base                  # the base model's fidelity
    nice -n 10 python -m toy.bench                         # every variant (QUALITY.md)
    nice -n 10 python -m toy.bench --variants default no_prior --seeds 0 1
    nice -n 10 python -m toy.bench --variants frozen_text lora --set prior_loss_weight=1.0
    python -m toy.bench --summary toy_bench.json           # mean and worst seed per variant
    nice -n 10 python -m toy.bench --variants default --keep models/   # keep the tarballs

The subject (world.SUBJECT, a white circle with a black core, which the pretrained `toy`
model never saw) is photographed INSTANCE_IMAGES times at random sizes and places on green, blue and
yellow backgrounds, and each variant trains on it with the product's own `train.run` and
TrainConfig (BENCH: the product's defaults scaled down to this world, plus the variant's
changes). The trained model is then sampled and scored by toy/score.py, in the DreamBooth
paper's terms:

  subject fidelity  share of `a photo of sks circle on a {bg} background` samples that show the
                    subject (bg: the three training backgrounds and red, never shown with it)
  prompt fidelity   share of those samples on the background asked for
  novel bg          the same two on the red background alone
  PRES              share of plain `a photo of a circle` samples that show the subject (lower
                    is better: the class did not turn into the subject)
  DIV               mean pairwise RMS pixel distance among those plain samples, 0-1 (higher is
                    better: the class kept its variety)
  world             share of world prompts (`a photo of a red star on a blue background`) still
                    drawn right after fine-tuning (language drift): seen combinations, and
                    world_held_out for the HELD_OUT ones
  novel bg both     subject and background both right on red, never photographed

With several seeds, each variant is also summarized: the mean and the worst seed of each
headline column (HEADLINE), and the spread between seeds, the noise a difference between two
variants must exceed. On a CPU a run is bit-identical for a seed: the noise is across seeds.

`--base` measures the base model on the world's prompts (seen combinations, HELD_OUT ones, and
captions without the shape colour): the ceiling for prompt fidelity. Results go to a JSON file
and a markdown table (QUALITY.md reproduces them).
"""

from __future__ import annotations

import argparse
import ast
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from train.quiet import quiet_libraries

from . import score, world

IDENTIFIER = "sks"
INSTANCE_PROMPT = f"a photo of {IDENTIFIER} {world.SUBJECT['shape']}"
CLASS_PROMPT = f"a photo of a {world.SUBJECT['shape']}"
INSTANCE_IMAGES = 5
EVAL_BACKGROUNDS = (*world.SUBJECT_BACKGROUNDS, world.SUBJECT_NEW_BACKGROUND)
# Sampling for evaluation: toy's own sampler (DDIM) at the step count and guidance the recipe
# draws class images with (25, 7.5; the recipe's sampler is DPM-Solver++).
SAMPLE = dict(steps=25, guidance=7.5)
# The product's defaults, scaled to this world: 64 px, fewer steps and class images, sampling
# steps as above. Everything else (prior preservation on, text encoder trained, full
# fine-tuning, constant schedule, AdamW settings) is TrainConfig's default. Two are changed on
# purpose, as QUALITY.md measures: the learning rate (the default 1e-6, for SD 1.5's 860 M UNet,
# does not move this 4 M one) and the prior loss weight (at 1 the subject was learned in 56 %
# of samples, at 0.25 in 73 %, the class still untouched).
BENCH = dict(model="toy", resolution=64, max_train_steps=800, num_class_images=50,
             class_infer_steps=SAMPLE["steps"], learning_rate=1e-4, prior_loss_weight=0.25,
             sample_batch_size=25, instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT)
# The class in the world's other contexts, for the prior (the prior_prompts setting): every
# caption form of a circle scene but the HELD_OUT combinations, which measure what the model
# keeps without being shown it.
CONTEXTS = "\n".join(
    [world.caption("circle", colour, bg) for colour in world.COLOURS for bg in world.COLOURS
     if colour != bg and ("circle", colour, bg) not in world.HELD_OUT]
    + [world.caption("circle", None, bg) for bg in world.COLOURS]
    + [world.caption("circle", colour, None) for colour in world.COLOURS])
# Beyond the class: every caption form of every shape (HELD_OUT combinations still left out),
# for a prior that keeps the rest of the world too.
WORLD_CONTEXTS = "\n".join(
    [world.caption(shape, colour, bg) for shape in world.SHAPES for colour in world.COLOURS
     for bg in world.COLOURS if colour != bg and (shape, colour, bg) not in world.HELD_OUT]
    + [world.caption(shape, None, bg) for shape in world.SHAPES for bg in world.COLOURS]
    + [world.caption(shape, colour, None) for shape in world.SHAPES for colour in world.COLOURS]
    + [world.caption(shape) for shape in world.SHAPES])
VARIANTS = {
    "default": {},
    "prior_weight_1": {"prior_loss_weight": 1.0},
    "prior_weight_0.5": {"prior_loss_weight": 0.5},
    "no_prior": {"with_prior_preservation": False},
    "frozen_text": {"train_text_encoder": False},
    "lora": {"use_lora": True, "learning_rate": 1e-3},
    "product_lr_1e-6": {"learning_rate": 1e-6},
    "lr_3e-5": {"learning_rate": 3e-5},
    "lr_3e-4": {"learning_rate": 3e-4},
    "steps_400": {"max_train_steps": 400},
    "steps_1600": {"max_train_steps": 1600},
    "plain_captions": {"_captions": False},
    "pad_tokens": {"pad_tokens": True},
    "class_guidance_3": {"class_guidance_scale": 3.0},
    "class_contexts": {"prior_prompts": CONTEXTS},
    "class_contexts_0.5": {"prior_prompts": CONTEXTS, "prior_loss_weight": 0.5},
    "class_contexts_lora": {"prior_prompts": CONTEXTS, "use_lora": True, "learning_rate": 1e-3},
    "class_contexts_lora_0.5": {"prior_prompts": CONTEXTS, "use_lora": True,
                                "learning_rate": 1e-3, "prior_loss_weight": 0.5},
    "class_contexts_lora_1": {"prior_prompts": CONTEXTS, "use_lora": True,
                              "learning_rate": 1e-3, "prior_loss_weight": 1.0},
    "class_world": {"prior_prompts": WORLD_CONTEXTS},
    "base_prior": {"prior_source": "base_model", "prior_loss_weight": 1.0},
    "base_prior_world_0.25": {"prior_source": "base_model", "prior_loss_weight": 0.25,
                              "prior_prompts": WORLD_CONTEXTS},
    "base_prior_contexts": {"prior_source": "base_model", "prior_loss_weight": 1.0,
                            "prior_prompts": CONTEXTS},
    "base_prior_world": {"prior_source": "base_model", "prior_loss_weight": 1.0,
                         "prior_prompts": WORLD_CONTEXTS},
    # Class images of the bare class (weight prior_loss_weight), and the base model's
    # predictions for the world's captions on the class images' latents (weight
    # context_loss_weight): prior_source class_images+base_model, named by the two weights.
    **{f"class_base_world_{class_w}_{context_w}": {
        "prior_source": "class_images+base_model", "prior_prompts": WORLD_CONTEXTS,
        "prior_loss_weight": class_w, "context_loss_weight": context_w}
       for class_w, context_w in ((0.125, 0.125), (0.25, 0.25), (0.5, 0.5), (1, 1), (1, 0.5),
                                  (0.5, 1))},
    **{f"class_base_world_lora_{class_w}_{context_w}": {
        "prior_source": "class_images+base_model", "prior_prompts": WORLD_CONTEXTS,
        "prior_loss_weight": class_w, "context_loss_weight": context_w, "use_lora": True,
        "learning_rate": 1e-3} for class_w, context_w in ((0.5, 0.5), (0.25, 0.25), (1, 0.5))},
    # in about the default's training time: the extra row and the base model's pass cost a
    # quarter more per step
    "class_base_world_1_0.5_600": {"prior_source": "class_images+base_model",
                                   "prior_prompts": WORLD_CONTEXTS, "prior_loss_weight": 1,
                                   "context_loss_weight": 0.5, "max_train_steps": 600},
    "base_prior_contexts_lora": {"prior_source": "base_model", "prior_loss_weight": 1.0,
                                 "prior_prompts": CONTEXTS, "use_lora": True,
                                 "learning_rate": 1e-3},
}


def write_instance_data(folder: Path, seed: int = 0, count: int = INSTANCE_IMAGES,
                        captions: bool = True) -> Path:
    """The subject's photos as PNGs; with `captions`, each with a sidecar caption in the world's
    style that names its background (`a photo of sks circle on a blue background`)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(10_000 + seed)
    for i in range(count):
        bg = world.SUBJECT_BACKGROUNDS[i % len(world.SUBJECT_BACKGROUNDS)]
        world.render(world.subject_scene(rng, bg)).save(folder / f"subject-{i}.png")
        if captions:
            (folder / f"subject-{i}.txt").write_text(
                world.caption(world.SUBJECT["shape"], None, bg, identifier=IDENTIFIER))
    return folder


def sample(pipe, prompts: list[str], seed: int, batch: int = 32) -> list:
    """One image per prompt, in batches, from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(prompts), batch):
        with torch.no_grad():
            images += pipe(prompts[i:i + batch], num_inference_steps=SAMPLE["steps"],
                           guidance_scale=SAMPLE["guidance"], height=world.SIZE,
                           width=world.SIZE, generator=generator).images
    return images


def prompt_sets(n: int, seed: int) -> dict[str, list[tuple]]:
    """World prompts as (shape, colour or None, background): seen combinations, HELD_OUT ones,
    and captions that leave the shape colour out."""
    rng = np.random.default_rng(seed)
    seen = [world.random_scene(rng) for _ in range(n)]
    held = sorted(world.HELD_OUT)
    no_colour = [world.random_scene(rng, held_out="any") for _ in range(n)]
    return {"seen": [(s.shape, s.colour, s.background) for s in seen],
            "held_out": [held[i % len(held)] for i in range(n)],
            "no_colour": [(s.shape, None, s.background) for s in no_colour]}


def world_fidelity(pipe, n: int = 64, seed: int = 0) -> dict:
    """Share of samples showing every prompted attribute, per prompt set, and per attribute."""
    report = {}
    for name, wanted in prompt_sets(n, seed).items():
        got = score.score(sample(pipe, [world.caption(*w) for w in wanted], seed))
        right = {"shape": [g["shape"] == w[0] for g, w in zip(got, wanted)],
                 "colour": [w[1] is None or g["colour"] == w[1] for g, w in zip(got, wanted)],
                 "background": [g["background"] == w[2] for g, w in zip(got, wanted)]}
        report[name] = {"all": float(np.mean([all(r) for r in zip(*right.values())])),
                        **{k: float(np.mean(v)) for k, v in right.items()}, "n": len(wanted)}
    return report


def diversity(images) -> float:
    """Mean RMS distance between distinct images, pixels in 0-1."""
    x = torch.from_numpy(score.as_array(images)).float().flatten(1) / 255
    d = torch.cdist(x, x) / x.shape[1] ** 0.5
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def dreambooth_metrics(pipe, n_per_background: int = 16, n_class: int = 64,
                       seed: int = 0) -> dict:
    """Subject fidelity, prompt fidelity, PRES, DIV and world-prompt accuracy of a model."""
    wanted = [bg for bg in EVAL_BACKGROUNDS for _ in range(n_per_background)]
    prompts = [world.caption(world.SUBJECT["shape"], None, bg, identifier=IDENTIFIER)
               for bg in wanted]
    got = score.score(sample(pipe, prompts, seed))
    subject = np.array([g["subject"] for g in got])
    on_bg = np.array([g["background"] == bg for g, bg in zip(got, wanted)])
    novel = np.array([bg == world.SUBJECT_NEW_BACKGROUND for bg in wanted])
    plain = sample(pipe, [CLASS_PROMPT] * n_class, seed + 1)
    plain_scores = score.score(plain)
    drift = world_fidelity(pipe, n=32, seed=seed + 2)
    seen = ~novel
    return {"subject_fidelity": float(subject.mean()), "prompt_fidelity": float(on_bg.mean()),
            "both": float((subject & on_bg).mean()),
            "seen_bg_subject": float(subject[seen].mean()),
            "novel_bg_subject": float(subject[novel].mean()),
            "novel_bg_prompt": float(on_bg[novel].mean()),
            "novel_bg_both": float((subject & on_bg)[novel].mean()),
            "pres": float(np.mean([s["subject"] for s in plain_scores])),
            "div": round(diversity(plain), 4),
            "class_is_circle": float(np.mean([s["shape"] == world.SUBJECT["shape"]
                                              for s in plain_scores])),
            "world": drift["seen"]["all"], "world_held_out": drift["held_out"]["all"]}


def train_variant(overrides: dict, work: Path, seed: int = 0, log=lambda _: None) -> Path:
    """Train DreamBooth on the subject with the product's train.run; returns the model folder.
    Keys starting with `_` are the benchmark's own (`_captions`: sidecar captions or not)."""
    from train import TrainConfig, run

    own = {k: v for k, v in overrides.items() if k.startswith("_")}
    settings = {k: v for k, v in overrides.items() if not k.startswith("_")}
    photos = write_instance_data(work / "photos", seed, captions=own.get("_captions", True))
    config = TrainConfig(**{**BENCH, "instance_data": str(photos), "seed": 1337 + seed,
                            "output": str(work / "model.tar"), "work_dir": str(work / "tmp"),
                            **settings})
    tar = run(config, log=log)
    with tarfile.open(tar) as t:
        t.extractall(work / "model", filter="data")
    return work / "model"


def bench_variant(name: str, seed: int = 0, n_per_background: int = 16, n_class: int = 64,
                  log=lambda _: None, keep: Path | None = None, **changes) -> dict:
    """Train one variant (VARIANTS[name], updated by `changes`) and score it; with `keep`, its
    tarball is kept there as NAME-seedN.tar (for toy.quickstart's contact sheets)."""
    import shutil

    from train.evaluate import load_trained

    overrides = {**VARIANTS[name], **changes}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = train_variant(overrides, Path(tmp), seed, log)
        train_s = time.perf_counter() - start
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(tmp) / "model.tar", keep / f"{name}-seed{seed}.tar")
        # a LoRA output holds the adapter only: loaded onto its base model
        pipe = load_trained(folder, overrides.get("model", BENCH["model"]), "cpu")
        metrics = dreambooth_metrics(pipe, n_per_background, n_class, seed)
    return {"variant": name, "seed": seed, "overrides": overrides,
            "train_seconds": round(train_s, 1), **metrics}


def base_report(n: int, seed: int) -> dict:
    from train.models import load_pipeline

    pipe = load_pipeline("toy", "cpu")
    report = {"world": world_fidelity(pipe, n, seed)}
    # The ceiling for the subject prompts: the plain class on the evaluation backgrounds.
    wanted = [bg for bg in EVAL_BACKGROUNDS for _ in range(n // len(EVAL_BACKGROUNDS))]
    got = score.score(sample(pipe, [world.caption(world.SUBJECT["shape"], None, bg)
                                       for bg in wanted], seed))
    report["class_on_eval_backgrounds"] = float(np.mean(
        [g["background"] == bg and g["shape"] == world.SUBJECT["shape"]
         for g, bg in zip(got, wanted)]))
    plain = sample(pipe, [CLASS_PROMPT] * n, seed + 1)
    report["class_pres"] = float(np.mean([s["subject"] for s in score.score(plain)]))
    report["class_div"] = round(diversity(plain), 4)
    return report


COLUMNS = ["variant", "seed", "subject_fidelity", "prompt_fidelity", "both", "novel_bg_subject",
           "novel_bg_both", "pres", "div", "world", "world_held_out", "train_seconds"]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) and c != "train_seconds" else
                 str(r[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The headline of a recipe over seeds: (column, what it is, whether higher is better). The
# worst seed is the lowest for a higher-is-better column, the highest for PRES.
HEADLINE = [("seen_bg_subject", "subject on the photographed backgrounds", True),
            ("novel_bg_both", "subject and background right on red (never photographed)", True),
            ("world", "world prompts after training, seen combinations", True),
            ("world_held_out", "world prompts after training, held-out combinations", True),
            ("pres", "PRES: plain class samples showing the subject", False),
            ("div", "DIV of the plain class samples", True)]


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant, in the order first seen: the seeds, and the mean and worst seed of each
    HEADLINE column, the spread between seeds (max - min), and the mean training time."""
    variants = {}
    for row in rows:
        variants.setdefault(row["variant"], []).append(row)
    summary = []
    for name, runs in variants.items():
        entry = {"variant": name, "seeds": [r["seed"] for r in runs],
                 "train_seconds": float(np.mean([r["train_seconds"] for r in runs]))}
        for column, _, higher in HEADLINE:
            values = [r[column] for r in runs]
            entry[column] = {"mean": float(np.mean(values)),
                             "worst": min(values) if higher else max(values),
                             "spread": max(values) - min(values)}
        summary.append(entry)
    return summary


def summary_table(summary: list[dict], base_div: float | None = None) -> str:
    """Markdown: a row per variant, each headline column as `mean (worst)`."""
    head = ["variant", "seeds", *(c for c, _, _ in HEADLINE), "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summary:
        cells = [entry["variant"], " ".join(map(str, entry["seeds"]))]
        cells += [f"{entry[c]['mean']:.2f} ({entry[c]['worst']:.2f})" for c, _, _ in HEADLINE]
        cells.append(f"{entry['train_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    if base_div is not None:
        lines.append(f"\nThe base model's DIV on the same plain-class samples: {base_div:.2f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toy.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", action="store_true", help="score the base model only")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--n", type=int, default=64, help="samples per prompt set (--base)")
    parser.add_argument("--per-background", type=int, default=16)
    parser.add_argument("--out", default="toy_bench.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="change a TrainConfig setting in every variant, e.g. "
                             "--set prior_loss_weight=1.0")
    parser.add_argument("--keep", type=Path, metavar="FOLDER",
                        help="keep each trained model's tarball there, as NAME-seedN.tar")
    parser.add_argument("--summary", metavar="JSON", nargs="+",
                        help="only print the per-variant summary (mean and worst seed) of the "
                             "rows in JSON files earlier runs wrote")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary_table(summarize([row for name in args.summary
                                       for row in json.loads(Path(name).read_text())])))
        return 0
    changes = {}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            changes[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[key] = value
    torch.set_num_threads(args.threads)
    quiet_libraries(loading=True)
    if args.base:
        report = base_report(args.n, args.seeds[0])
        print(json.dumps(report, indent=1))
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        return 0
    rows = []
    for name in args.variants:
        for seed in args.seeds:
            rows.append(bench_variant(name, seed, args.per_background, 4 * args.per_background,
                                      keep=args.keep, **changes))
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    print(summary_table(summarize(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
