"""The shipped `toy` model loads as a built-in and follows prompts, and DreamBooth on it learns
the subject while prior preservation keeps the class apart from it, and class images of the
class in other contexts keep the rest of the world: reduced toy/bench.py runs (the full ones,
and their numbers, are in QUALITY.md).

    .venv/bin/python -m pytest tests/test_toy.py -q      # a few minutes on 2 cores
"""

from __future__ import annotations

import pytest
import torch

from toy import bench as toy_bench
from train.models import check_model, load_pipeline


@pytest.fixture(autouse=True)
def one_thread():
    # The toy model is small: one thread is as fast, and far faster on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_toy_is_a_builtin_sd1_folder():
    assert check_model("toy") == "sd1"
    pipe = load_pipeline("toy", "cpu")
    assert pipe.unet.dtype == torch.float32  # shipped in fp16, loaded in fp32 for training
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    ids = pipe.tokenizer("a photo of sks circle on a blue background").input_ids
    assert len(ids) == 2 + 9  # start, end and one token per word: the world's words are whole


def test_toy_follows_prompts():
    # The full measurement (64 prompts a set) is in QUALITY.md; 16 a set here, with a margin
    # for the smaller sample.
    report = toy_bench.world_fidelity(load_pipeline("toy", "cpu"), n=16, seed=5)
    for name in ("seen", "held_out", "no_colour"):
        assert report[name]["all"] >= 0.75, (name, report)


REDUCED = dict(n_per_background=4, n_class=16, num_class_images=16)
# PRES (the share of plain class samples showing the subject) of the same run without prior
# preservation: 0.88 reduced (seed 0), 0.81-0.95 over three seeds in the full benchmark
# (QUALITY.md); that run is not repeated here. A recipe that keeps the class apart stays well
# below it: the default 0.38 reduced, the chosen recipe 0.12.
PRES_CEILING = 0.6


@pytest.fixture(scope="module")
def default_run():
    """The default recipe, on fewer class images and samples than the full benchmark."""
    return toy_bench.bench_variant("default", **REDUCED)


def test_dreambooth_learns_the_subject(default_run):
    assert default_run["subject_fidelity"] >= 0.5, default_run
    assert default_run["prompt_fidelity"] >= 0.5, default_run


def test_prior_preservation_keeps_the_class_apart_from_the_subject(default_run):
    assert default_run["pres"] <= PRES_CEILING, default_run


def test_the_base_models_contexts_on_class_images_keep_the_world(default_run):
    """QUALITY.md's chosen recipe, reduced: class images of the bare class, each also kept by
    the base model's predictions for the world's other contexts (prior_source
    class_images+base_model, prior_prompts), keep the world's prompts (seen and held-out
    combinations) far better than the default, still learn the subject, and keep the class
    apart from it. Measured here: world 0.77 against 0.59, subject 0.50 (8 of 16 samples),
    PRES 0.12 (full benchmark, 3 seeds: world 0.86 against 0.60, subject 0.85, PRES 0.02)."""
    chosen = toy_bench.bench_variant("class_base_world_1_0.5", **REDUCED)
    kept = (chosen["world"] + chosen["world_held_out"]) / 2
    assert kept >= (default_run["world"] + default_run["world_held_out"]) / 2 + 0.1, \
        (chosen, default_run)
    # 16 class images instead of 50 hold the subject back more than in the full benchmark
    assert chosen["subject_fidelity"] >= 0.4 and chosen["prompt_fidelity"] >= 0.5, chosen
    assert chosen["pres"] <= PRES_CEILING, chosen


def test_the_quickstart_writes_photos_the_trainer_reads_and_draws_a_contact_sheet(tmp_path):
    """script/quickstart's two ends around the trainer (here around the base toy model, which
    the trainer's output replaces there): the photos, then a row per background and the class."""
    from PIL import Image

    from helpers import ROOT
    from toy import quickstart
    from train.intake import read_images

    photos = quickstart.write_photos(tmp_path / "photos")
    found, skipped = read_images(str(photos), "instance_data", "a photo of sks circle", 64)
    assert len(found) == 5 and skipped == []
    assert {ex.caption for ex in found} == {f"a photo of sks circle on a {bg} background"
                                            for bg in ("green", "blue", "yellow")}
    sheet = Image.open(quickstart.sheet(ROOT / "toy" / "model", photos, tmp_path / "sheet.png"))
    rows = 1 + 4 + 1  # the photos; green, blue, yellow and red; the plain class
    assert sheet.size == (4 + quickstart.PER_ROW * (96 + 4), 4 + rows * (16 + 96 + 4))


def test_the_benchmark_summarizes_each_recipe_by_its_mean_and_worst_seed():
    """What decisions are read from: a recipe over seeds, mean and worst (lowest, or highest
    for PRES, where lower is better), and the spread between seeds."""
    rows = [dict(variant=name, seed=seed, train_seconds=60.0 + seed, seen_bg_subject=subject,
                 novel_bg_both=0.5, world=1.0 - seed / 10, world_held_out=0.9, pres=pres,
                 div=0.4)
            for name, runs in (("default", [(0, 0.7, 0.0), (1, 0.9, 0.1), (2, 0.8, 0.05)]),
                               ("no_prior", [(0, 1.0, 0.9)]))
            for seed, subject, pres in runs]
    default, no_prior = toy_bench.summarize(rows)
    assert (default["variant"], default["seeds"], no_prior["seeds"]) == ("default", [0, 1, 2],
                                                                         [0])
    assert default["seen_bg_subject"] == pytest.approx({"mean": 0.8, "worst": 0.7,
                                                        "spread": 0.2})
    assert default["pres"]["worst"] == 0.1 and default["world"]["worst"] == pytest.approx(0.8)
    assert default["train_seconds"] == 61.0
    table = toy_bench.summary_table([default, no_prior]).splitlines()
    assert table[2].startswith("| default | 0 1 2 | 0.80 (0.70) | 0.50 (0.50) | 0.90 (0.80) |")
