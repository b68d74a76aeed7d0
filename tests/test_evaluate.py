"""Evaluation: the paper's metrics on inputs with known answers, its prompts, the feature models,
the whole render -> features -> metrics -> report path on the tiny model, and the proxies.

The feature models here are the `tiny` built-ins (random weights, built from config): the
numbers they give are not meaningful, the path they run is the real one. The proxies compare
the diffusion model's own predictions, so they mean something even with random weights.
"""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from helpers import FAST, ROOT, read_training_json, train_tiny, unet_weights
from train import UserError
from train.evaluate import (DEFAULT_CLIP, DEFAULT_DINO, DEFINITIONS, contact_sheet,
                            denoising_probe, denoising_proxies, evaluate, main, pick_balanced)
from train.example_data import write_example_zip
from train.intake import read_images
from train.metrics import (build_feature_models, clip_image_features, clip_text_features,
                           cross_similarity, diversity, dino_features, load_feature_models,
                           paired_similarity, preprocess, save_feature_models, self_similarity)
from train.models import build_builtin, load_pipeline
from train.prompts import subject_prompts, templates, without_identifier

PROMPTS = ["a sks ball in the snow", "a red sks ball"]  # two of the paper's, for speed
EVAL = dict(prompts=PROMPTS, n_per_prompt=2, n_prior=2, steps=2, guidance=7.5, seed=0,
            resolution=64, batch_size=2)


# --- Metrics on constructed features ------------------------------------------------------------

def test_identical_features_score_one_and_orthogonal_zero():
    a = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    assert cross_similarity(a, a * 3) != pytest.approx(1.0)  # pairs across rows differ...
    assert cross_similarity(a[:1], a[:1] * 3) == pytest.approx(1.0)  # ...scale does not count
    e = torch.eye(4)
    assert cross_similarity(e[:2], e[2:]) == pytest.approx(0.0)
    assert cross_similarity(e[:1], -e[:1]) == pytest.approx(-1.0)
    # 60 degrees apart: cosine 0.5; the mean runs over every pair
    sixty = torch.tensor([[1.0, 0.0], [0.5, 3 ** 0.5 / 2]])
    assert cross_similarity(sixty[:1], sixty[1:]) == pytest.approx(0.5)
    assert cross_similarity(e[:1], torch.stack([e[0], e[1]])) == pytest.approx(0.5)


def test_self_similarity_leaves_out_each_image_with_itself():
    e = torch.eye(3)
    assert self_similarity(e) == pytest.approx(0.0)  # not 1/3: the diagonal is left out
    assert self_similarity(torch.ones(5, 8)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two"):
        self_similarity(e[:1])


def test_paired_similarity_matches_rows_not_all_pairs():
    e = torch.eye(3)
    assert paired_similarity(e, e) == pytest.approx(1.0)
    assert paired_similarity(e, e[[1, 2, 0]]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="as many rows"):
        paired_similarity(e, e[:2])


def test_diversity_of_identical_images_is_zero_of_orthogonal_one():
    same = torch.tensor([[0.3, -1.0, 2.0]]).repeat(4, 1)
    assert diversity([same, same * 2]) == pytest.approx(0.0)
    assert diversity([torch.eye(4)]) == pytest.approx(1.0)
    assert diversity([same, torch.eye(3)]) == pytest.approx(0.5)  # averaged over prompts
    assert diversity([same, torch.eye(3)[:1]]) == pytest.approx(0.0)  # one image: no pairs
    with pytest.raises(ValueError):
        diversity([same[:1]])


def test_pick_balanced_weighs_subject_and_prompt_fidelity():
    def ev(dino, clip_t):
        return {"metrics": {"dino": dino, "clip_t": clip_t}}

    # Under-trained, balanced, over-trained (the subject everywhere, the prompt ignored).
    assert pick_balanced([ev(0.40, 0.32), ev(0.62, 0.30), ev(0.70, 0.22)]) == 1
    assert pick_balanced([ev(0.5, 0.3), ev(0.6, 0.2)]) == 0  # a tie goes to the earlier step
    assert pick_balanced([ev(0.5, 0.3)]) == 0


# --- Images, preprocessing and feature models ---------------------------------------------------

@pytest.fixture(scope="module")
def features():
    return build_feature_models("tiny")


def stripes(width=64, height=32):
    """Black margins left and right of a white centre square."""
    image = Image.new("RGB", (width, height), "black")
    ImageDraw.Draw(image).rectangle(((width - height) // 2, 0, (width + height) // 2 - 1,
                                     height - 1), fill="white")
    return image


def test_preprocessing_resizes_crops_and_normalises_per_model(features):
    clip = preprocess([stripes()], features.clip_prep)  # short side to 32, centre crop 32
    white = (1.0 - torch.tensor(features.clip_prep["image_mean"])) / torch.tensor(
        features.clip_prep["image_std"])
    assert clip.shape == (1, 3, 32, 32)
    assert torch.allclose(clip[0], white[:, None, None].expand(3, 32, 32), atol=1e-5)
    dino = preprocess([stripes()], features.dino_prep)  # squashed to 32x32: margins stay
    black = -torch.tensor(features.dino_prep["image_mean"]) / torch.tensor(
        features.dino_prep["image_std"])
    assert dino.shape == (1, 3, 32, 32)
    assert torch.allclose(dino[0, :, :, 0], black[:, None].expand(3, 32), atol=1e-5)
    # an int size with a crop is the short side (CLIP's own config); without one, a square
    plain = {"image_mean": [0, 0, 0], "image_std": [1, 1, 1]}
    old_clip = preprocess([stripes()], dict(plain, size=32, crop_size=32, do_center_crop=True))
    assert torch.equal(old_clip, torch.ones(1, 3, 32, 32))
    old_vit = preprocess([stripes()], dict(plain, size=32))
    assert old_vit.shape == (1, 3, 32, 32) and old_vit[0, :, :, 0].max() == 0


def test_identical_images_score_one_different_less(features, photos_zip):
    photos = [e.image for e in read_images(photos_zip, "x", "", 64)[0]][:2]
    same = [photos[0], photos[0].copy()]
    for embed in (dino_features, clip_image_features):
        f = embed(features, same)
        assert cross_similarity(f[:1], f[1:]) == pytest.approx(1.0, abs=1e-6)
        g = embed(features, photos)
        assert cross_similarity(g[:1], g[1:]) < 0.9999
    text = clip_text_features(features, ["a ball in the snow", "a ball in the snow", "a dog"])
    assert paired_similarity(text[:1], text[1:2]) == pytest.approx(1.0, abs=1e-6)
    assert paired_similarity(text[:1], text[2:]) < 0.9999


def test_feature_models_load_from_folders_as_downloads_are(tmp_path, features):
    save_feature_models(features, tmp_path / "dino", tmp_path / "clip")
    loaded = load_feature_models(str(tmp_path / "dino"), str(tmp_path / "clip"))
    image = [stripes(40, 56)]
    assert torch.allclose(dino_features(loaded, image), dino_features(features, image))
    assert torch.allclose(clip_image_features(loaded, image), clip_image_features(features, image))
    assert torch.allclose(clip_text_features(loaded, ["a dog"]),
                          clip_text_features(features, ["a dog"]))
    assert loaded.sources == {"dino": str(tmp_path / "dino"), "clip": str(tmp_path / "clip")}
    with pytest.raises(UserError, match="download-weights --eval"):
        load_feature_models(str(tmp_path / "nothing"), "tiny")
    (tmp_path / "dino" / "preprocessor_config.json").unlink()
    with pytest.raises(UserError, match="no preprocessor_config.json"):
        load_feature_models(str(tmp_path / "dino"), "tiny")


def test_random_feature_models_are_the_real_architectures():
    models = build_feature_models("random", "meta")  # shapes only, no memory
    assert sum(p.numel() for p in models.dino.parameters()) == 21_665_664  # ViT-S/16, no pooler
    assert sum(p.numel() for p in models.clip.parameters()) == 151_277_313  # CLIP ViT-B/32
    assert models.dino.config.patch_size == 16 and models.clip.config.vision_config.patch_size == 32


def test_download_weights_fetches_feature_models_into_the_default_folders():
    # --help only: the script parses its arguments before importing anything heavy.
    out = subprocess.run([sys.executable, str(ROOT / "script" / "download-weights"), "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    for folder in (DEFAULT_DINO, DEFAULT_CLIP):
        assert "DEST/" + folder.removeprefix("weights/") in " ".join(out.split())
    assert "--eval" in out and "facebook/dino-vits16" in out


# --- Prompts ------------------------------------------------------------------------------------

def test_the_papers_prompts_per_subject_kind():
    objects, kind = subject_prompts("a photo of sks backpack", "a photo of a backpack")
    assert kind == "object" and len(objects) == len(set(objects)) == 25
    assert objects[0] == "a sks backpack in the jungle"
    assert "a sks backpack floating in an ocean of milk" in objects
    assert objects[-5:] == ["a red sks backpack", "a purple sks backpack", "a shiny sks backpack",
                            "a wet sks backpack", "a cube shaped sks backpack"]
    live, kind = subject_prompts("a photo of zwx dog", "a photo of a dog")
    assert kind == "live" and len(live) == len(set(live)) == 25
    assert "a zwx dog wearing a santa hat" in live and "a zwx dog floating on top of water" \
        not in live
    assert live[:10] == [p.replace("sks backpack", "zwx dog") for p in objects[:10]]
    forced, kind = subject_prompts("a photo of sks dog", "a photo of a dog", "object")
    assert kind == "object" and forced[10] == "a sks dog with a wheat field in the background"
    assert len(templates("object")) == len(templates("live")) == 25
    assert without_identifier("a sks dog in the snow", "sks") == "a dog in the snow"


# --- The whole path on the tiny model -----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny runs at equal steps, with and without prior preservation (fp32 weights), and a
    probe of the base model with photos of the subject that neither run trained on."""
    tmp = tmp_path_factory.mktemp("runs")
    photos = write_example_zip(tmp / "photos.zip", count=4, size=64)
    held_out = [e.image for e in read_images(write_example_zip(
        tmp / "held.zip", count=3, size=64, seed=7), "held_out", "", 64)[0]]
    runs = {ppl: train_tiny(tmp, photos, name=f"prior-{ppl}", with_prior_preservation=ppl,
                            save_precision="fp32")[0] for ppl in (True, False)}
    base = build_builtin("tiny")
    probe = denoising_probe(base, held_out, "a photo of sks ball", "a photo of a ball",
                            resolution=64, steps=2, log=lambda _: None)
    return {"photos": photos, "runs": runs, "probe": probe, "base": base, "tmp": tmp}


def test_evaluate_renders_scores_and_reports(trained, features, tmp_path):
    pipe = load_pipeline(str(trained["runs"][True]), "cpu")
    photos = [e.image for e in read_images(trained["photos"], "x", "", 64)[0]]
    lines = []
    report = evaluate(pipe, photos, "a photo of sks ball", "a photo of a ball", features, tmp_path,
                      probe=trained["probe"], log=lines.append, **EVAL)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved == json.loads(json.dumps(report))
    m = saved["metrics"]
    for name in ("dino", "clip_i", "clip_t", "pres", "real_dino", "real_clip_i"):
        assert -1.0 <= m[name] <= 1.0, name
    assert 0.0 < m["div"] <= 2.0  # distinct seeds give distinct images
    assert set(m) | {"per_prompt", "fidelity_proxy", "drift_proxy", "balanced"} == \
        set(DEFINITIONS)  # every number has its definition
    assert [p["prompt"] for p in saved["per_prompt"]] == PROMPTS
    assert saved["per_prompt"][1]["clip_t_text"] == "a red ball"
    # pooled metrics are the means of the per-prompt ones (equal images per prompt)
    assert m["dino"] == pytest.approx(sum(p["dino"] for p in saved["per_prompt"]) / 2, abs=1e-5)
    proto = saved["protocol"]
    assert (proto["n_prompts"], proto["n_per_prompt"], proto["n_prior"], proto["real_images"]) \
        == (2, 2, 2, 4)
    assert proto["prompts"] == "user" and proto["identifier"] == "sks"
    assert saved["feature_models"]["random_weights"] and "not meaningful" in saved["note"]
    fid = saved["proxies"]["fidelity"]
    assert fid["held_out"] and fid["error_ratio"] < 1.0  # it learned to denoise the subject
    assert saved["proxies"]["drift"]["prompt"] == "a photo of a ball"
    assert lines[-1].startswith("evaluation: dino ")
    sheet = Image.open(tmp_path / "contact_sheet.png")
    # rows: the 4 photos, 2 prompts of 2 images, the class prompt's 2
    assert sheet.size == (4 + 4 * (128 + 4), 4 * (16 + 128 + 4) + 4)
    # row 1 is the real photos: the first thumbnail is the first photo, centre-cropped
    thumb = sheet.crop((4, 4 + 16, 4 + 128, 4 + 16 + 128))
    expected = photos[0].resize((128, 128), Image.Resampling.LANCZOS)
    diff = torch.tensor(list(thumb.getdata())) - torch.tensor(list(expected.getdata()))
    assert diff.abs().float().mean() < 2


def test_the_base_model_against_its_own_probe_has_not_moved(trained):
    proxies = denoising_proxies(trained["base"], trained["probe"])
    assert proxies["fidelity"]["error_ratio"] == pytest.approx(1.0)
    assert proxies["drift"]["error_ratio"] == pytest.approx(1.0)
    assert proxies["drift"]["change"] == pytest.approx(0.0)


def test_prior_preservation_keeps_the_class_prompt_closer_at_equal_steps(trained):
    """With prior preservation the class prompt's denoising error on new class images of the
    base model stays lower than without it. Measured before relying on it: 24 of 24 pairs of
    runs (training seeds 0-4 and 1337, probe seeds 0 and 5, 4 and 12 steps); at 4 steps
    0.944-0.949 of the base's error with it, 0.956-0.973 without. The raw change of the
    predictions is not compared: a random base has no prior to keep, any training moves its
    predictions, and prior preservation's class images move them more (higher in 12 of 12
    pairs at 12 steps; see DEFINITIONS["drift_proxy"])."""
    drift = {ppl: denoising_proxies(load_pipeline(str(folder), "cpu"),
                                    trained["probe"])["drift"]
             for ppl, folder in trained["runs"].items()}
    assert drift[True]["error_ratio"] < drift[False]["error_ratio"] < 1.0
    assert drift[True]["change"] > 0 and drift[False]["change"] > 0


def test_cli_evaluates_a_tarball_with_what_training_json_records(trained, tmp_path, capsys):
    tar = trained["tmp"] / "prior-True.tar"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# mine\na sks ball on the beach\n\na sks ball in the jungle\n")
    code = main(["--model", str(tar), "--instance-data", str(trained["photos"]), "--dino", "tiny",
                 "--clip", "tiny", "--prompts", str(prompts), "--n-per-prompt", "2",
                 "--n-prior", "0", "--steps", "2", "--output", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert [p["prompt"] for p in saved["per_prompt"]] == ["a sks ball on the beach",
                                                          "a sks ball in the jungle"]
    proto = saved["protocol"]
    assert proto["instance_prompt"] == "a photo of sks ball"  # from training.json
    assert proto["sampling"]["resolution"] == 64 and proto["n_prior"] == 0
    assert saved["metrics"]["pres"] is None
    assert saved["proxies"]["fidelity"]["held_out"] is False  # no --held-out: training photos
    code = main(["--model", str(tmp_path / "missing.tar"), "--instance-data",
                 str(trained["photos"])])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --model") and len(err.splitlines()) == 1


def test_contact_sheet_rows_follow_their_images():
    red, blue = Image.new("RGB", (40, 20), "red"), Image.new("RGB", (20, 20), "blue")
    sheet = contact_sheet([("real photos", [red]), ("a prompt that is long " * 8, [blue] * 5)],
                          thumb=32)
    assert sheet.size == (4 + 5 * 36, 2 * (16 + 32 + 4) + 4)
    assert sheet.getpixel((4 + 16, 4 + 16 + 16)) == (255, 0, 0)
    assert sheet.getpixel((4 + 4 * 36 + 16, 4 + 52 + 16 + 16)) == (0, 0, 255)


# --- Evaluation inside a training run -----------------------------------------------------------

RUN_EVAL = dict(evaluate=True, eval_dino="tiny", eval_clip="tiny", eval_images_per_prompt=2,
                eval_prompts="a sks ball in the snow\n\na red sks ball\n", save_infer_steps=2,
                save_precision="fp32", max_train_steps=6)


def test_a_run_with_evaluate_scores_each_checkpoint_and_names_the_balanced_one(tmp_path,
                                                                              photos_zip):
    folder, lines = train_tiny(tmp_path, photos_zip, **RUN_EVAL, checkpointing_steps=2,
                               checkpoints_total_limit=0,
                               checkpoint_dir=str(tmp_path / "ckpt"))
    report = json.loads((folder / "evaluation.json").read_text())
    assert [p["prompt"] for p in report["per_prompt"]] == ["a sks ball in the snow",
                                                           "a red sks ball"]
    assert report["protocol"]["n_per_prompt"] == 2 and report["protocol"]["real_images"] == 4
    assert report["protocol"]["sampling"]["steps"] == 2  # the sample settings
    fidelity = report["proxies"]["fidelity"]
    assert fidelity["held_out"] is False and fidelity["error_ratio"] < 1.0
    assert report["proxies"]["drift"]["prompt"] == "a photo of a ball"
    assert Image.open(folder / "contact_sheet.png").size[1] == 4 * (16 + 128 + 4) + 4
    # checkpoints at 2 and 4 are scored in training, 6 is the final model (and a checkpoint)
    steps = [c["step"] for c in report["checkpoints"]]
    assert steps == [2, 4, 6]
    assert report["checkpoints"][-1]["metrics"] == report["metrics"]
    assert report["checkpoints"][-1]["checkpoint"] == str(tmp_path / "ckpt" / "step-000006")
    best = pick_balanced(report["checkpoints"])
    assert report["balanced"]["step"] == steps[best]
    record = read_training_json(folder)
    assert record["evaluation"]["balanced"] == [report["balanced"]]
    assert "evaluate" in record["timings"] and "probe" in record["timings"]
    assert any(line.startswith("evaluation: the best balance") for line in lines)
    # each checkpoint before the last holds its own report, and the scores so far
    for step in (2, 4):
        ckpt = tmp_path / "ckpt" / f"step-{step:06d}"
        saved = json.loads((ckpt / "evaluation" / "evaluation.json").read_text())
        assert saved["metrics"] == report["checkpoints"][step // 2 - 1]["metrics"]
        assert (ckpt / "evaluation" / "contact_sheet.png").is_file()
        assert [e["step"] for e in json.loads((ckpt / "evaluations.json").read_text())] == \
            list(range(2, step + 1, 2))
    # a run resumed from step 4 carries the scores of steps 2 and 4 on
    resumed, _ = train_tiny(tmp_path, photos_zip, name="resumed", **RUN_EVAL,
                            resume=str(tmp_path / "ckpt" / "step-000004"))
    again = json.loads((resumed / "evaluation.json").read_text())
    assert [c["step"] for c in again["checkpoints"]] == [2, 4, 6]
    assert again["checkpoints"][:2] == report["checkpoints"][:2]


def test_evaluation_leaves_the_trained_weights_unchanged(tmp_path, photos_zip):
    """Rendering and scoring at every checkpoint must not touch training (random state, modes):
    the weights match a run without evaluation bit for bit."""
    plain, _ = train_tiny(tmp_path, photos_zip, name="plain", save_precision="fp32",
                          max_train_steps=6, checkpointing_steps=3,
                          checkpoint_dir=str(tmp_path / "c1"))
    scored, _ = train_tiny(tmp_path, photos_zip, name="scored", **RUN_EVAL,
                           checkpointing_steps=3, checkpoint_dir=str(tmp_path / "c2"))
    a, b = unet_weights(plain), unet_weights(scored)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (plain / "evaluation.json").exists()
    assert read_training_json(plain)["evaluation"] is None


def test_evaluate_without_feature_models_is_refused_before_any_model_loads(tmp_path,
                                                                           photos_zip):
    from train import TrainConfig, run

    settings = {**FAST, **RUN_EVAL, "instance_data": str(photos_zip),
                "instance_prompt": "a photo of sks ball", "class_prompt": "a photo of a ball",
                "output": str(tmp_path / "x.tar")}
    config = TrainConfig(**{**settings, "eval_dino": str(tmp_path / "none")})
    with pytest.raises(UserError, match="dino feature model .* script/download-weights --eval"):
        run(config, log=lambda _: None)
    assert not (tmp_path / "x.tar").exists()
    with pytest.raises(UserError, match="eval_prompts holds no prompt"):
        TrainConfig(**{**settings, "eval_prompts": " \n "})
