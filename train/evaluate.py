"""Evaluate a trained DreamBooth model as the paper does, and write a report a person can read.

    python -m train.evaluate --model dog.tar --instance-data dog.zip          # an output tarball
    python -m train.evaluate --model out/ --instance-data dog.zip --dino tiny --clip tiny \
        --n-per-prompt 2 --steps 2                                            # offline trial

It renders the trained model on the paper's 25 prompts for the subject's kind (train/prompts.py;
or the user's prompts), `n_per_prompt` images each, plus `n_prior` images of the plain class
prompt, and scores them against the real photos with DINO, CLIP-I, CLIP-T, PRES and DIV
(train/metrics.py). It writes into a folder:

  evaluation.json    every number, its definition, the protocol, the feature models used
  contact_sheet.png  the real photos, then one row of generated images per prompt

Two more numbers mean something even when every model has random weights (CI, the `tiny`
model), because they compare the diffusion model's own predictions on fixed inputs:

  fidelity proxy  the trained model's denoising error on held-out photos of the subject with
                  the instance prompt, against the base model's (lower: it learned the subject)
  drift proxy     on class images the base model drew, with the class prompt: how far the
                  trained model's predictions moved from the base model's, and its denoising
                  error against the base's (lower: the class is kept; see DEFINITIONS for which
                  of the two shows prior preservation on random weights)

Both need the base model's predictions: `denoising_probe` records them before training (the
recipe) or from the base model loaded again (this CLI, from training.json). From Python:

    probe = denoising_probe(pipe, photos, instance_prompt, class_prompt, resolution=512)
    ... train pipe ...
    report = evaluate(pipe, photos, instance_prompt, class_prompt,
                      load_feature_models(DEFAULT_DINO, DEFAULT_CLIP), out_folder, probe=probe,
                      steps=50, guidance=7.5, seed=0, resolution=512)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import families
from .data import image_tensor, prompt_texts, scale_latents, tokenize
from .errors import UserError, exit_status
from .intake import prompt_words, read_images, require_images
from .metrics import (DEFAULT_CLIP, DEFAULT_DINO, FEATURE_BUILTINS, FeatureModels,
                      clip_image_features, clip_text_features, cross_similarity, diversity,
                      dino_features, load_feature_models, paired_similarity, self_similarity)
from .models import load_pipeline
from .prompts import SUBJECT_KINDS, subject_prompts, without_identifier
from .quiet import quiet_libraries
from .sampling import generate

# Timesteps the proxies probe: the whole range, as training draws them, without the extremes
# where the prediction is trivial (t near 0: almost no noise; near 1000: almost no image).
PROBE_TIMESTEPS = (100, 300, 500, 700, 900)
# The paper's numbers (Ruiz et al. 2022, table 1), for scale: DreamBooth on Stable Diffusion,
# and the real photos scored against each other.
PAPER = {"dreambooth_stable_diffusion": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
         "real_images": {"dino": 0.774, "clip_i": 0.885}}

DEFINITIONS = {
    "dino": "subject fidelity: mean cosine similarity of DINO features (CLS token) over every "
            "(generated image, real photo) pair, all prompts pooled; higher is better",
    "clip_i": "subject fidelity: as dino, with CLIP image embeddings; higher is better",
    "clip_t": "prompt fidelity: mean cosine similarity between each generated image's CLIP image "
              "embedding and the CLIP text embedding of its prompt with the identifier removed "
              "(CLIP does not know the identifier); higher is better",
    "pres": "prior preservation: mean DINO cosine similarity over every (image of the class "
            "prompt, real photo) pair; lower is better (the class still looks like other "
            "members of it, not like the subject)",
    "div": "diversity: 1 - mean DINO cosine similarity between distinct images of the same "
           "prompt, averaged over prompts; higher is better (0 when all are identical). The "
           "paper uses LPIPS distance, which needs VGG/AlexNet weights; DINO stands in for it",
    "real_dino": "reference: mean DINO cosine similarity between distinct real photos (the "
                 "paper's 'real images' row): how alike the photos are to each other",
    "real_clip_i": "reference: as real_dino, with CLIP image embeddings",
    "per_prompt": "dino, clip_i, clip_t and div of each prompt's images alone",
    "fidelity_proxy": "denoising error (mean squared error of the UNet's noise or v "
                      "prediction, as the training loss) on photos of the subject with the "
                      "instance prompt, at fixed noise and timesteps: trained_error against "
                      "base_error (the model before training); error_ratio = trained / base, "
                      "below 1 when the model learned to denoise the subject. held_out says "
                      "whether the photos were kept out of training",
    "drift_proxy": "language drift: the class prompt on class images the base model drew "
                   "(not those trained on), at fixed noise and timesteps. change = mean squared "
                   "difference between the trained and the base model's predictions over the "
                   "mean square of the base's (the drift from the base model's predictions); "
                   "error_ratio = trained / base denoising error. Lower is better for both. For "
                   "a base model that denoises its own images well the two agree (the trained "
                   "error is the base error plus the change). A base with random weights (the "
                   "tiny test models) has no prior to keep: any training lowers the error and "
                   "raises the change, prior preservation's extra class images more so, and "
                   "only error_ratio shows it (lower with prior preservation at equal steps)",
    "balanced": "the checkpoint to pick: each of dino and clip_t rescaled to [0, 1] across the "
                "checkpoints (min to max), the highest sum wins, the earlier step on a tie",
}


# --- Rendering and scoring ------------------------------------------------------------------

def evaluate(pipe, instance_images: list[Image.Image], instance_prompt: str,
             class_prompt: str | None, feature_models: FeatureModels, out_folder: Path, *,
             prompts: list[str] | None = None, subject_kind: str = "auto", n_per_prompt: int = 4,
             n_prior: int = 8, steps: int = 50, guidance: float = 7.5, seed: int = 0,
             resolution: int = 512, batch_size: int = 4, probe: dict | None = None,
             log=print) -> dict:
    """Render, score and report (see the module docstring); returns what evaluation.json holds.

    `instance_images` are the real photos (PIL). `prompts` replaces the paper's 25 (the user's
    own, identifier included; `subject_kind` then does not matter). Prompt i is rendered with
    seed `seed + i`, so the same seed gives the same starting noise at every checkpoint; the
    class prompt's images with the next seed, `seed + len(prompts)`.
    `probe` (from denoising_probe) adds the fidelity and drift proxies. Writes evaluation.json
    and contact_sheet.png into `out_folder`."""
    if len(instance_images) < 1:
        raise UserError("evaluation needs the real photos of the subject (instance images)")
    if n_per_prompt < 1:
        raise UserError("n_per_prompt must be at least 1")
    start = time.perf_counter()
    identifier, noun = prompt_words(instance_prompt, class_prompt)
    if prompts is None:
        prompts, kind = subject_prompts(instance_prompt, class_prompt, subject_kind)
    else:
        prompts = [p for p in (p.strip() for p in prompts) if p]
        if not prompts:
            raise UserError("the evaluation prompt list is empty")
        kind = "user"
    render = dict(batch_size=batch_size, steps=steps, guidance=guidance, resolution=resolution)
    quiet = lambda _line: None  # noqa: E731  one progress line per prompt, below

    generated = []
    for i, prompt in enumerate(prompts):
        generated.append(generate(pipe, prompt, n_per_prompt, seed=seed + i, log=quiet,
                                  **render))
        log(f"evaluation: {i + 1}/{len(prompts)} prompts rendered "
            f"({time.perf_counter() - start:.1f}s)")
    prior = []
    if class_prompt and n_prior > 0:
        prior = generate(pipe, class_prompt, n_prior, seed=seed + len(prompts), log=quiet,
                         **render)
    render_s = time.perf_counter() - start

    # Features: real photos, every generated image, the class images, the prompts' texts.
    flat = [im for group in generated for im in group]
    real_dino = dino_features(feature_models, instance_images)
    real_clip = clip_image_features(feature_models, instance_images)
    gen_dino = dino_features(feature_models, flat)
    gen_clip = clip_image_features(feature_models, flat)
    texts = [without_identifier(p, identifier) for p in prompts]
    text_clip = clip_text_features(feature_models, texts)
    per_text = text_clip.repeat_interleave(n_per_prompt, dim=0)
    groups = [slice(i * n_per_prompt, (i + 1) * n_per_prompt) for i in range(len(prompts))]
    metrics = {
        "dino": cross_similarity(gen_dino, real_dino),
        "clip_i": cross_similarity(gen_clip, real_clip),
        "clip_t": paired_similarity(gen_clip, per_text),
        "pres": (cross_similarity(dino_features(feature_models, prior), real_dino)
                 if prior else None),
        "div": diversity([gen_dino[g] for g in groups]) if n_per_prompt >= 2 else None,
        "real_dino": self_similarity(real_dino) if len(instance_images) >= 2 else None,
        "real_clip_i": self_similarity(real_clip) if len(instance_images) >= 2 else None,
    }
    per_prompt = [{
        "prompt": prompt, "clip_t_text": text,
        "dino": cross_similarity(gen_dino[g], real_dino),
        "clip_i": cross_similarity(gen_clip[g], real_clip),
        "clip_t": paired_similarity(gen_clip[g], per_text[g]),
        "div": diversity([gen_dino[g]]) if n_per_prompt >= 2 else None,
    } for prompt, text, g in zip(prompts, texts, groups)]
    score_s = time.perf_counter() - start - render_s
    proxies = denoising_proxies(pipe, probe) if probe is not None else None
    proxies_s = time.perf_counter() - start - render_s - score_s

    out_folder = Path(out_folder)
    out_folder.mkdir(parents=True, exist_ok=True)
    rows = [("real photos", list(instance_images))]
    rows += list(zip(prompts, generated))
    if prior:
        rows.append((f"class prompt: {class_prompt}", prior))
    contact_sheet(rows).save(out_folder / "contact_sheet.png")
    report = {
        "metrics": _rounded(metrics),
        "per_prompt": [_rounded(p) for p in per_prompt],
        "proxies": _rounded(proxies) if proxies else None,
        "definitions": DEFINITIONS,
        "protocol": {
            "prompts": "user" if kind == "user" else f"the paper's 25 {kind} prompts",
            "subject_kind": kind, "identifier": identifier, "class_noun": noun,
            "instance_prompt": instance_prompt, "class_prompt": class_prompt,
            "real_images": len(instance_images), "n_prompts": len(prompts),
            "n_per_prompt": n_per_prompt, "n_prior": len(prior),
            "compared": "dino and clip_i: each generated image with each real photo; clip_t: "
                        "each generated image with its own prompt; pres: each class-prompt image "
                        "with each real photo; div: pairs of images within one prompt",
            "sampling": {"steps": steps, "guidance": guidance, "resolution": resolution,
                         "seed": seed, "seeds": f"prompt i uses seed {seed} + i, the class "
                                                 f"prompt the next one",
                         "scheduler": type(pipe.scheduler).__name__},
            "paper": "Ruiz et al. 2022 (DreamBooth), section 4: 25 prompts per subject, 4 images "
                     "per prompt, DINO ViT-S/16 and CLIP features, PRES and DIV",
        },
        "feature_models": dict(feature_models.sources, random_weights=any(
            s in FEATURE_BUILTINS for s in feature_models.sources.values())),
        "paper": PAPER,
        "timings": {"render": round(render_s, 3), "score": round(score_s, 3),
                    "proxies": round(proxies_s, 3)},
        "files": ["evaluation.json", "contact_sheet.png"],
    }
    if report["feature_models"]["random_weights"]:
        report["note"] = ("the feature models have random weights: dino, clip_i, clip_t, pres "
                          "and div are not meaningful here (the proxies are)")
    (out_folder / "evaluation.json").write_text(json.dumps(report, indent=2, allow_nan=False)
                                                + "\n")
    log(summary_line(report))
    return report


def summary_line(report: dict) -> str:
    m = report["metrics"]
    parts = [f"{name} {m[name]:.3f}" for name in ("dino", "clip_i", "clip_t", "pres", "div")
             if m.get(name) is not None]
    proxies = report.get("proxies") or {}
    fidelity, drift = proxies.get("fidelity") or {}, proxies.get("drift") or {}
    if fidelity.get("error_ratio") is not None:
        parts.append(f"subject denoising error x{fidelity['error_ratio']:.3f} of base")
    if drift.get("error_ratio") is not None and drift.get("change") is not None:
        parts.append(f"class prompt: error x{drift['error_ratio']:.3f} of base, "
                     f"change {drift['change']:.4f}")
    return "evaluation: " + "  ".join(parts)


def _rounded(value):
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def pick_balanced(evaluations: list[dict]) -> int:
    """Index of the evaluation (one per checkpoint, in step order) that balances subject and
    prompt fidelity best: dino and clip_t each rescaled to [0, 1] across the evaluations, the
    highest sum; the earliest on a tie. (Over-trained checkpoints gain dino and lose clip_t.)"""
    if not evaluations:
        raise ValueError("pick_balanced needs at least one evaluation")
    scores = [0.0] * len(evaluations)
    for name in ("dino", "clip_t"):
        values = [e["metrics"][name] for e in evaluations]
        low, high = min(values), max(values)
        for i, v in enumerate(values):
            scores[i] += (v - low) / (high - low) if high > low else 0.0
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# --- During a training run: each checkpoint scored, the best balanced one named ---------------

def evaluate_concepts(pipe, config, concepts, instance, features, probes, folder: Path,
                      log) -> list[dict]:
    """Score the model as it is now, one report per concept, written into `folder` (or
    folder/evaluation/k with several concepts). Leaves the UNet and text encoders in eval mode:
    the next training segment puts them back in train mode."""
    families.denoiser(pipe).eval()
    reports = []
    for k, concept in enumerate(concepts):
        where = folder if len(concepts) == 1 else folder / "evaluation" / str(k)
        reports.append(evaluate(
            pipe, [ex.image for ex in instance if ex.concept == k], concept.instance_prompt,
            concept.class_prompt, features, where, prompts=config.eval_prompt_list(),
            n_per_prompt=config.eval_images_per_prompt, steps=config.save_infer_steps,
            guidance=config.save_guidance_scale, seed=config.seed,
            resolution=config.resolution, batch_size=config.sample_batch_size,
            probe=probes[k], log=log))
    return reports


def brief(reports: list[dict]) -> list[dict]:
    """What training.json and the checkpoint list keep of each concept's report."""
    return [{"metrics": r["metrics"], "proxies": r["proxies"]} for r in reports]


def pick_checkpoint(candidates: list[dict], out: Path, n_concepts: int, log) -> dict:
    """Name the checkpoint (or the final model: the last candidate) that balances subject and
    prompt fidelity best, in each concept's evaluation.json; returns what training.json
    records of it."""
    balanced = []
    for k in range(n_concepts):
        best = candidates[pick_balanced([c["reports"][k] for c in candidates])]
        balanced.append({"step": best["step"], "checkpoint": best["checkpoint"]})
        path = out / "evaluation.json" if n_concepts == 1 else (
            out / "evaluation" / str(k) / "evaluation.json")
        report = json.loads(path.read_text())
        report["checkpoints"] = [{"step": c["step"], "checkpoint": c["checkpoint"],
                                  **c["reports"][k]} for c in candidates]
        report["balanced"] = balanced[-1]
        path.write_text(json.dumps(report, indent=2) + "\n")
        if len(candidates) > 1:
            where = "the final model" if best is candidates[-1] else best["checkpoint"]
            log(f"evaluation: the best balance of subject and prompt fidelity is at step "
                f"{best['step']} ({where})")
    return {"checkpoints": candidates, "balanced": balanced}


# --- The contact sheet ----------------------------------------------------------------------

def contact_sheet(rows: list[tuple[str, list[Image.Image]]], thumb: int = 128) -> Image.Image:
    """One row per (label, images): the label on a strip above, the images as `thumb`-pixel
    squares (centre-cropped) side by side."""
    label_h, pad = 16, 4
    columns = max(len(images) for _, images in rows)
    width = max(pad + columns * (thumb + pad), 4 * thumb)  # room for the prompts
    sheet = Image.new("RGB", (width, len(rows) * (label_h + thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for label, images in rows:
        draw.text((pad, y + 2), _fit(draw, label, width - 2 * pad), fill="black")
        y += label_h
        for j, image in enumerate(images):
            sheet.paste(_square(image, thumb), (pad + j * (thumb + pad), y))
        y += thumb + pad
    return sheet


def _square(image: Image.Image, side: int) -> Image.Image:
    image = image.convert("RGB")
    short = min(image.size)
    left, top = (image.width - short) // 2, (image.height - short) // 2
    return image.crop((left, top, left + short, top + short)).resize(
        (side, side), Image.Resampling.LANCZOS)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    while len(text) > 4 and draw.textlength(text) > width:
        text = text[:-4] + "..."
    return text


# --- Proxies: the diffusion model's own predictions on fixed inputs --------------------------

@torch.no_grad()
def denoising_probe(pipe, instance_images: list[Image.Image], instance_prompt: str,
                    class_prompt: str | None, *, resolution: int, seed: int = 0,
                    held_out: bool = True, class_images: list[Image.Image] | None = None,
                    n_class: int = 4, steps: int = 50, guidance: float = 7.5,
                    timesteps=PROBE_TIMESTEPS, log=print) -> dict:
    """Fixed inputs for the proxies, and `pipe`'s answers to them: call it with the base model
    (before training, or loaded again). Photos of the subject (`held_out`: kept out of
    training) go with the instance prompt; class images with the class prompt: by default
    `n_class` new ones that `pipe` draws for the class prompt (seed `seed + 1000`, not the
    seeds training's class images came from). Each image is centre-cropped to `resolution`,
    encoded by the VAE (its mean: no sampling) and noised at every timestep with noise drawn
    from `seed`. Everything is kept on the CPU."""
    if class_prompt and class_images is None and n_class > 0:
        class_images = generate(pipe, class_prompt, n_class, batch_size=n_class, steps=steps,
                                guidance=guidance, seed=seed + 1000, resolution=resolution,
                                label="probe class images", log=log)
    probe = {"timesteps": list(timesteps), "resolution": resolution, "seed": seed}
    generator = torch.Generator().manual_seed(seed)
    sets = [("fidelity", instance_images, instance_prompt)]
    if class_prompt and class_images:
        sets.append(("drift", class_images, class_prompt))
    for name, images, prompt in sets:
        latents = _latents(pipe, images, resolution)
        x0 = latents.repeat(len(timesteps), 1, 1, 1)  # every image at every timestep
        inputs = {"prompt": prompt, "images": len(images), "latents": x0,
                  "noise": torch.randn(x0.shape, generator=generator),
                  "t": torch.tensor(timesteps).repeat_interleave(len(images))}
        inputs["base"] = _predict(pipe, inputs)
        probe[name] = inputs
    probe["fidelity"]["held_out"] = held_out
    return probe


def denoising_proxies(pipe, probe: dict) -> dict:
    """The fidelity and drift proxies of `pipe` (the trained model) on a probe's inputs (see
    DEFINITIONS): for each, the trained and base model's denoising errors and their ratio;
    for drift also the change of the predictions themselves."""
    family = families.get(families.of(pipe))
    scheduler = family.training_scheduler(pipe.scheduler.config)
    out = {"timesteps": probe["timesteps"]}
    for name in ("fidelity", "drift"):
        if name not in probe:
            continue
        inputs = probe[name]
        pred = _predict(pipe, inputs)
        _, target = family.noisy_and_target(scheduler, inputs["latents"], inputs["noise"],
                                            inputs["t"])
        target = target.float()
        trained = float(((pred - target) ** 2).mean())
        base = float(((inputs["base"] - target) ** 2).mean())
        out[name] = {"prompt": inputs["prompt"], "images": inputs["images"],
                     "trained_error": trained, "base_error": base,
                     "error_ratio": trained / base if base > 0 else None}
        if name == "fidelity":
            out[name]["held_out"] = inputs["held_out"]
        else:
            scale = float((inputs["base"] ** 2).mean())
            change = float(((pred - inputs["base"]) ** 2).mean())
            out[name]["change"] = change / scale if scale > 0 else None
    return out


@torch.no_grad()
def _latents(pipe, images: list[Image.Image], resolution: int) -> torch.Tensor:
    """[n, c, h, w] float32 on the CPU: the VAE's mean latent of each image, centre-cropped to
    `resolution`, shifted and scaled as training caches them (data.scale_latents)."""
    vae = pipe.vae
    pixels = torch.stack([image_tensor(im.convert("RGB"), resolution, True, random.Random(0))
                          for im in images])
    out = []
    for start in range(0, len(pixels), 8):
        batch = pixels[start:start + 8].to(vae.device, vae.dtype)
        out.append(vae.encode(batch).latent_dist.mean.float().cpu())
    return scale_latents(families.get(families.of(pipe)), vae, torch.cat(out))[0]


@torch.no_grad()
def _predict(pipe, inputs: dict, batch_size: int = 8) -> torch.Tensor:
    """The denoiser's predictions (through the pipeline's own text encoders, the prompt padded
    to its full length as the pipeline renders it) for a probe's inputs, float32 on the CPU."""
    family = families.get(families.of(pipe))
    scheduler = family.training_scheduler(pipe.scheduler.config)
    encoders, tokenizers = families.text_encoders(pipe), families.tokenizers(pipe)
    denoiser = families.denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    ids = [tokenize(tok, prompt_texts(family, tok, [inputs["prompt"]]),
                    family.TEXT_LENGTHS.get(name))[0].to(enc.device)
           for (_, name), tok, enc in zip(family.TEXT, tokenizers, encoders)]
    states, pooled = family.encode_text(encoders, ids)
    preds = []
    for start in range(0, len(inputs["t"]), batch_size):
        part = slice(start, start + batch_size)
        x0, noise, t = inputs["latents"][part], inputs["noise"][part], inputs["t"][part]
        noisy, _ = family.noisy_and_target(scheduler, x0, noise, t)
        noisy = noisy.to(device, dtype)
        n = len(t)
        side = x0.shape[-1] * pipe.vae_scale_factor  # an uncropped square image's time ids
        time_ids = (torch.tensor([[side, side, 0, 0, side, side]] * n, device=device, dtype=dtype)
                    if family.TIME_IDS else None)
        out = family.denoise(denoiser, noisy, t.to(device), states.expand(n, -1, -1).to(dtype),
                             None if pooled is None else pooled.expand(n, -1).to(dtype), time_ids)
        preds.append(out.float().cpu())
    return torch.cat(preds)


# --- The command line -----------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as `python -m train` answers a mistake
        self.exit(2, f"error: {message} (see python -m train.evaluate --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m train.evaluate",
                     description="Evaluate a trained DreamBooth output as the paper does "
                                 "(DINO, CLIP-I, CLIP-T, PRES, DIV) and write evaluation.json "
                                 "and contact_sheet.png.")
    add = parser.add_argument
    add("--model", required=True, metavar="PATH",
        help="the trainer's output: its tarball or the untarred folder")
    add("--instance-data", required=True, metavar="PATH",
        help="the subject's real photos: a ZIP, tar, folder or image, as for training")
    add("--held-out", metavar="PATH",
        help="photos of the subject kept out of training, for the fidelity proxy (default: "
             "the instance photos)")
    add("--output", metavar="FOLDER",
        help="where to write the report (default: the model folder, or NAME-evaluation/ "
             "next to a tarball)")
    add("--instance-prompt", metavar="TEXT", help="default: the one training.json records")
    add("--class-prompt", metavar="TEXT", help="default: the one training.json records")
    add("--base-model", metavar="MODEL",
        help="the model before training, for the proxies: a diffusers folder or built-in name "
             "(default: training.json's model; 'none' skips the proxies)")
    add("--dino", default=DEFAULT_DINO, metavar="FOLDER",
        help=f"DINO ViT-S/16 folder, or a built-in name: tiny, random (default: {DEFAULT_DINO})")
    add("--clip", default=DEFAULT_CLIP, metavar="FOLDER",
        help=f"CLIP folder, or a built-in name: tiny, random (default: {DEFAULT_CLIP})")
    add("--prompts", metavar="FILE",
        help="your own prompts, one a line, identifier included (default: the paper's 25)")
    add("--subject-kind", default="auto", choices=SUBJECT_KINDS,
        help="which of the paper's lists: object or live (default: auto, from the class noun)")
    add("--n-per-prompt", type=int, default=4, metavar="N", help="images per prompt (default 4)")
    add("--n-prior", type=int, default=8, metavar="N",
        help="images of the class prompt for PRES (default 8; 0 = none)")
    add("--steps", type=int, default=50, metavar="N", help="sampling steps (default 50)")
    add("--guidance", type=float, default=7.5, metavar="X", help="guidance scale (default 7.5)")
    add("--seed", type=int, default=0, metavar="N", help="seed of the first prompt (default 0)")
    add("--resolution", type=int, metavar="N", help="default: the training resolution")
    add("--batch-size", type=int, default=4, metavar="N", help="images rendered at once")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status(lambda: run_cli(args))


def run_cli(args, log=print) -> dict:
    """The CLI's work: read the output and its training.json, load the models, evaluate."""
    quiet_libraries()
    for name in ("n_per_prompt", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    model = Path(args.model)
    if not model.exists():
        raise UserError(f"--model {args.model} not found: give the trainer's output tarball or "
                        f"its untarred folder")
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        folder = _untar(model, Path(tmp)) if model.is_file() else model
        record = _training_record(folder)
        config = record.get("config", {})
        instance_prompt = args.instance_prompt or config.get("instance_prompt")
        class_prompt = args.class_prompt or config.get("class_prompt")
        resolution = args.resolution or config.get("resolution") or 512
        if not instance_prompt:
            raise UserError("--instance-prompt is needed: the output has no training.json "
                            "that records it")
        base = args.base_model or _base_of(config)
        prompts = None
        if args.prompts:
            path = Path(args.prompts)
            if not path.exists() or path.is_dir():
                raise UserError(f"--prompts {args.prompts} not found: give a text file with "
                                f"one prompt a line")
            prompts = [line for line in path.read_text().splitlines()
                       if line.strip() and not line.lstrip().startswith("#")]
        photos, skipped = read_images(args.instance_data, "instance_data", instance_prompt,
                                      resolution)
        require_images(photos, skipped, "instance_data")
        held = photos
        if args.held_out:
            held, skipped = read_images(args.held_out, "held_out", instance_prompt, resolution)
            require_images(held, skipped, "held_out")
        quiet_libraries(loading=True)
        features = load_feature_models(args.dino, args.clip, _device())
        device = _device()
        probe = None
        if base and base != "none":
            log(f"evaluation: base model {base}, for the proxies")
            with _autocast():
                probe = denoising_probe(load_pipeline(base, device), [ex.image for ex in held],
                                        instance_prompt, class_prompt, resolution=resolution,
                                        seed=args.seed, held_out=bool(args.held_out),
                                        steps=args.steps, guidance=args.guidance, log=log)
        else:
            log("evaluation: no base model (training.json names none, or a single file: give "
                "--base-model), so no proxies")
        pipe = load_trained(folder, base, device)
        out = Path(args.output) if args.output else (
            model.with_name(model.name.removesuffix(".tar") + "-evaluation")
            if model.is_file() else model)
        with _autocast():
            report = evaluate(pipe, [ex.image for ex in photos], instance_prompt, class_prompt,
                              features, out, prompts=prompts, subject_kind=args.subject_kind,
                              n_per_prompt=args.n_per_prompt, n_prior=args.n_prior,
                              steps=args.steps, guidance=args.guidance, seed=args.seed,
                              resolution=resolution, batch_size=args.batch_size, probe=probe,
                              log=log)
    log(f"wrote {out / 'evaluation.json'} and {out / 'contact_sheet.png'}")
    return report


def load_trained(folder: Path, base: str | None, device):
    """The trained pipeline of an output folder: its diffusers folder, or (a LoRA-only output)
    the base model with the LoRA of lora/ loaded."""
    if (folder / "model_index.json").is_file():
        return load_pipeline(str(folder), device)
    if (folder / "lora" / "pytorch_lora_weights.safetensors").is_file():
        if not base or base == "none":
            raise UserError("the output holds only a LoRA: give --base-model, the model it was "
                            "trained on")
        pipe = load_pipeline(base, device)
        pipe.load_lora_weights(str(folder / "lora"))
        return pipe
    raise UserError(f"{folder} holds no diffusers model (model_index.json) or LoRA (lora/): "
                    f"evaluate an output trained with output_format diffusers or lora")


def _untar(path: Path, dest: Path) -> Path:
    try:
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")  # no member can write outside dest
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"--model {path} is not a readable tarball ({e})") from None
    return dest


def _training_record(folder: Path) -> dict:
    path = folder / "training.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _base_of(config: dict) -> str | None:
    """The base model training.json records, as load_pipeline takes it."""
    if config.get("base_checkpoint"):
        return None  # a single file needs its config folder: pass --base-model
    return config.get("model")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast():
    """fp16 sampling on a GPU, as the recipe renders samples; exact fp32 on a CPU."""
    if torch.cuda.is_available():
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


if __name__ == "__main__":
    sys.exit(main())
