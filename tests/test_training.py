"""The training recipe on the tiny model: it learns, prior preservation counts, every setting acts.

Each test runs the real `train.run` (real diffusers and transformers models built from configs)
and reads the tarball it wrote.
"""

import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import (FAST, image_bytes, make_zip, read_training_json, train_tiny, unet_weights)
from train import TrainConfig, run
from train.data import encode_images, tokenize
from train.intake import read_images
from train.families.ddpm import noise_target
from train.loop import dreambooth_loss
from train.models import build_builtin


def weight_change(folder, base):
    trained = unet_weights(folder)
    return math.sqrt(sum(((trained[k].float() - v.float()) ** 2).sum().item()
                         for k, v in base.items()))


@pytest.fixture(scope="module")
def base_unet():
    """The tiny UNet before training, rounded to fp16 as outputs are saved."""
    return {k: v.half() for k, v in build_builtin("tiny").unet.state_dict().items()}


@torch.no_grad()
def denoising_loss(unet, text_encoder, tokenizer, latents, prompt, seed=0):
    """Mean noise-prediction error over fixed noise and fixed timesteps."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.tensor([50, 200, 400, 600, 800])
    states = text_encoder(tokenize(tokenizer, [prompt])[0])[0]
    total = 0.0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator)
        noisy = scheduler.add_noise(latents, noise, t.repeat(len(latents)))
        pred = unet(noisy, t, states.expand(len(latents), -1, -1)).sample
        total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / len(timesteps)


def test_the_loop_learns_the_instance_images(tmp_path, photos_zip):
    from diffusers import DiffusionPipeline

    out, _ = train_tiny(tmp_path, photos_zip, max_train_steps=40, learning_rate=1e-3,
                        with_prior_preservation=False, train_text_encoder=False)
    base = build_builtin("tiny")
    images, _ = read_images(photos_zip, "instance_data", "", 64)
    latents = torch.stack(encode_images(base.vae, images, 64, True, seed=0)[0])[:, 0]
    prompt = "a photo of sks ball"
    before = denoising_loss(base.unet, base.text_encoder, base.tokenizer, latents, prompt)
    trained = DiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    after = denoising_loss(trained.unet, trained.text_encoder, trained.tokenizer, latents, prompt)
    print(f"denoising loss before {before:.4f} after {after:.4f}")
    assert after < 0.6 * before, (before, after)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, photos_zip):
    a, _ = train_tiny(tmp_path, photos_zip, "a", max_train_steps=3)
    b, _ = train_tiny(tmp_path, photos_zip, "b", max_train_steps=3)
    c, _ = train_tiny(tmp_path, photos_zip, "c", max_train_steps=3, seed=7)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        wa, wb, wc = (load_file(x / part) for x in (a, b, c))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part
        assert not all(torch.equal(wa[k], wc[k]) for k in wa), part


def test_prior_preservation_adds_a_weighted_class_loss(tmp_path, photos_zip):
    out, lines = train_tiny(tmp_path, photos_zip, prior_loss_weight=2.5, num_class_images=3)
    record = read_training_json(out)
    for h in record["history"]:
        assert h["class_loss"] > 0
        assert h["loss"] == pytest.approx(h["instance_loss"] + 2.5 * h["class_loss"], rel=1e-5)
    generated = [c for c in record["dataset"]["class"]["used"] if c["file"].startswith("gen")]
    assert len(generated) == 3
    assert any(line.startswith("class images: 3/3") for line in lines)

    off, _ = train_tiny(tmp_path, photos_zip, "off", with_prior_preservation=False)
    record = read_training_json(off)
    assert record["dataset"]["class"]["used"] == []
    assert all(h["class_loss"] == 0 and h["loss"] == h["instance_loss"]
               for h in record["history"])


def test_the_prior_loss_weight_changes_the_weights(tmp_path, photos_zip, base_unet):
    zero, _ = train_tiny(tmp_path, photos_zip, "zero", prior_loss_weight=0.0)
    one, _ = train_tiny(tmp_path, photos_zip, "one", prior_loss_weight=1.0)
    assert not torch.equal(unet_weights(zero)["conv_in.weight"],
                           unet_weights(one)["conv_in.weight"])


def test_dreambooth_loss_splits_the_batch():
    pred = torch.zeros(4, 1)
    target = torch.tensor([[1.0], [1.0], [2.0], [2.0]])
    total, instance, prior = dreambooth_loss(pred[:2], target[:2], pred[2:], target[2:],
                                             prior_loss_weight=0.5)
    assert (instance.item(), prior.item(), total.item()) == (1.0, 4.0, 3.0)


def test_class_data_counts_toward_num_class_images(tmp_path, photos_zip):
    class_zip = make_zip(tmp_path / "class.zip", {f"dogs/{i}.jpg": image_bytes() for i in range(4)})
    out, _ = train_tiny(tmp_path, photos_zip, class_data=str(class_zip), num_class_images=5)
    used = [c["file"] for c in read_training_json(out)["dataset"]["class"]["used"]]
    assert used == ["dogs/0.jpg", "dogs/1.jpg", "dogs/2.jpg", "dogs/3.jpg", "generated/0000.png"]

    out, _ = train_tiny(tmp_path, photos_zip, "capped", class_data=str(class_zip),
                        num_class_images=2)
    dataset = read_training_json(out)["dataset"]["class"]
    assert [c["file"] for c in dataset["used"]] == ["dogs/0.jpg", "dogs/1.jpg"]
    assert [c["file"] for c in dataset["skipped"]] == ["dogs/2.jpg", "dogs/3.jpg"]


def test_epochs_used_when_max_train_steps_is_zero(tmp_path, photos_zip):
    out, lines = train_tiny(tmp_path, photos_zip, max_train_steps=0, num_train_epochs=3,
                            with_prior_preservation=False, train_batch_size=2)
    record = read_training_json(out)
    assert len(record["history"]) == 6  # 4 images, batch 2: 2 steps an epoch
    assert record["plan"]["epochs"] == 3

    out, lines = train_tiny(tmp_path, photos_zip, "steps", max_train_steps=5, num_train_epochs=3,
                            with_prior_preservation=False)
    assert len(read_training_json(out)["history"]) == 5
    assert any("num_train_epochs=3 is overridden by max_train_steps=5" in x for x in lines)


def test_scale_lr_and_accumulation(tmp_path, photos_zip):
    out, _ = train_tiny(tmp_path, photos_zip, scale_lr=True, train_batch_size=2,
                        gradient_accumulation_steps=3, max_train_steps=2,
                        with_prior_preservation=False)
    history = read_training_json(out)["history"]
    assert len(history) == 2
    assert all(h["lr"] == pytest.approx(1e-4 * 2 * 3) for h in history)


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "polynomial",
                                  "constant", "constant_with_warmup"])
def test_every_lr_scheduler(tmp_path, photos_zip, name):
    out, _ = train_tiny(tmp_path, photos_zip, lr_scheduler=name, lr_warmup_steps=2,
                        max_train_steps=6, with_prior_preservation=False,
                        train_text_encoder=False, lr_num_cycles=2)
    lrs = [h["lr"] / 1e-4 for h in read_training_json(out)["history"]]
    assert lrs[:2] == [0.0, 0.5]  # linear warm-up over 2 steps, "constant" included
    assert lrs[2] == pytest.approx(1.0)
    if name in ("linear", "polynomial"):  # polynomial (power 1) decays to 1e-7, not 0
        assert lrs[3:] == pytest.approx([0.75, 0.5, 0.25], abs=1e-2)
    if name == "cosine":
        assert lrs[3:] == pytest.approx([(1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3)])
    if name == "cosine_with_restarts":  # two cycles of 2 steps each after warm-up
        assert lrs[4] == pytest.approx(1.0)
    if name in ("constant", "constant_with_warmup"):
        assert lrs[3:] == [1.0] * 3


def test_max_grad_norm_clips(tmp_path, photos_zip, base_unet):
    free, _ = train_tiny(tmp_path, photos_zip, "free", max_grad_norm=0.0,
                         with_prior_preservation=False, max_train_steps=3)
    clipped, _ = train_tiny(tmp_path, photos_zip, "clipped", max_grad_norm=1e-7,
                            with_prior_preservation=False, max_train_steps=3)
    # Adam normalises the step, but gradients clipped far below epsilon barely move weights.
    assert weight_change(clipped, base_unet) < 0.1 * weight_change(free, base_unet)
    norms = [h["grad_norm"] for h in read_training_json(clipped)["history"]]
    assert all(n > 1e-7 for n in norms)  # the recorded norm is the one before clipping


def test_8bit_adam_trains(tmp_path, photos_zip, base_unet):
    out, _ = train_tiny(tmp_path, photos_zip, use_8bit_adam=True, with_prior_preservation=False)
    assert weight_change(out, base_unet) > 0


def test_gradient_checkpointing_gives_the_same_weights(tmp_path, photos_zip):
    plain, _ = train_tiny(tmp_path, photos_zip, "plain", max_train_steps=2)
    ckpt, _ = train_tiny(tmp_path, photos_zip, "ckpt", max_train_steps=2,
                         gradient_checkpointing=True)
    a, b = unet_weights(plain), unet_weights(ckpt)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_pad_tokens_changes_what_the_unet_sees(tmp_path, photos_zip):
    short, _ = train_tiny(tmp_path, photos_zip, "short", train_text_encoder=False)
    padded, _ = train_tiny(tmp_path, photos_zip, "padded", train_text_encoder=False,
                           pad_tokens=True)
    assert not torch.equal(unet_weights(short)["conv_in.weight"],
                           unet_weights(padded)["conv_in.weight"])


def test_slicing_a_padded_embedding_equals_padding_less():
    pipe = build_builtin("tiny")
    ids, lengths = tokenize(pipe.tokenizer, ["a photo of sks ball", "a photo of a ball on a table"])
    longest = int(lengths.max())
    with torch.no_grad():
        full = pipe.text_encoder(ids)[0]
        short = pipe.text_encoder(ids[:, :longest])[0]
    assert ids.shape[1] == 77 and longest < 77
    torch.testing.assert_close(full[:, :longest], short)


def test_v_prediction_target():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    torch.testing.assert_close(noise_target(scheduler, latents, noise, t),
                               scheduler.get_velocity(latents, noise, t))
    assert noise_target(DDPMScheduler(), latents, noise, t) is noise


def test_a_failed_run_cleans_up_and_spares_the_users_files(tmp_path, photos_zip):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "keep.txt").write_text("not the trainer's")
    broken = tmp_path / "broken-model"
    broken.mkdir()  # looks like a pipeline folder, but its components are missing
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", '
                                             '"unet": ["diffusers", "UNet2DConditionModel"]}')
    config = TrainConfig(**dict(FAST, model=str(broken)), instance_data=str(photos_zip),
                         instance_prompt="a photo of sks ball", with_prior_preservation=False,
                         output=str(tmp_path / "o.tar"), work_dir=str(work))
    with pytest.raises(Exception):
        run(config, log=lambda _: None)
    assert [p.name for p in work.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "o.tar").exists() and not (tmp_path / "o.tar.partial").exists()


@pytest.mark.parametrize("where, message", [
    (dict(output="{tmp}"), "is a folder: give a file path"),
    (dict(output="{tmp}/a-file/o.tar"), "output: cannot write in"),
    (dict(work_dir="{tmp}/a-file"), "work_dir: cannot write in"),
])
def test_unwritable_places_are_refused_before_training(tmp_path, photos_zip, where, message):
    from train import UserError

    (tmp_path / "a-file").write_text("a file, not a folder")
    places = {k: v.format(tmp=tmp_path) for k, v in where.items()}
    config = TrainConfig(**{**FAST, "output": str(tmp_path / "o.tar"), **places},
                         instance_data=str(photos_zip), instance_prompt="a photo",
                         with_prior_preservation=False)
    lines = []
    with pytest.raises(UserError, match=message):
        run(config, log=lines.append)
    assert lines == []  # nothing started


def test_text_encoder_trained_only_when_asked(tmp_path, photos_zip):
    base = {k: v.half() for k, v in build_builtin("tiny").text_encoder.state_dict().items()}

    def changed(folder):
        trained = {k.removeprefix("text_model."): v for k, v in  # saved as transformers 4 does
                   load_file(folder / "text_encoder" / "model.safetensors").items()}
        assert set(trained) >= set(base)
        return [k for k, v in base.items() if not torch.equal(trained[k], v)]

    on, _ = train_tiny(tmp_path, photos_zip, "on", train_text_encoder=True)
    off, _ = train_tiny(tmp_path, photos_zip, "off", train_text_encoder=False)
    assert len(changed(on)) > 10
    assert changed(off) == []


@pytest.mark.parametrize("setting, value", [("adam_beta1", 0.5), ("adam_beta2", 0.9),
                                            ("adam_weight_decay", 0.9), ("adam_epsilon", 1e-2)])
def test_every_adam_setting_acts(tmp_path, photos_zip, setting, value):
    common = dict(max_train_steps=3, with_prior_preservation=False, train_text_encoder=False,
                  learning_rate=1e-3)
    plain, _ = train_tiny(tmp_path, photos_zip, "plain", **common)
    changed, _ = train_tiny(tmp_path, photos_zip, "changed", **common, **{setting: value})
    assert not torch.equal(unet_weights(plain)["conv_in.weight"],
                           unet_weights(changed)["conv_in.weight"])


def test_flipped_views_are_cached_and_used(tmp_path, photos_zip, base_unet):
    from train.intake import read_images

    vae = build_builtin("tiny").vae
    images, _ = read_images(photos_zip, "instance_data", "", 64)
    mean, std = (torch.stack(x) for x in encode_images(vae, images, 64, True, seed=0, flip=True))
    assert mean.shape[:2] == (4, 2) and std.shape == mean.shape
    mirrored = [type(images[0])(e.file, e.caption, e.size, e.image.transpose(
        Image.Transpose.FLIP_LEFT_RIGHT)) for e in images]
    expected = torch.stack(encode_images(vae, mirrored, 64, True, seed=0)[0])[:, 0]
    torch.testing.assert_close(mean[:, 1], expected, atol=1e-4, rtol=1e-4)

    never, _ = train_tiny(tmp_path, photos_zip, "never", flip_p=0.0)
    always, _ = train_tiny(tmp_path, photos_zip, "always", flip_p=1.0)
    assert not torch.equal(unet_weights(never)["conv_in.weight"],
                           unet_weights(always)["conv_in.weight"])


def test_archive_captions_reach_training_and_prompts_are_checked(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {
        "a.jpg": image_bytes(), "b@S C on the beach.jpg": image_bytes((0, 0, 200)),
        "c.jpg": image_bytes((0, 200, 0)), "c.txt": b"a painting of S"})
    out, lines = train_tiny(tmp_path, archive, instance_prompt="a photo of sks",
                            class_prompt="a photo of a ball")
    used = {u["file"]: u["caption"] for u in read_training_json(out)["dataset"]["instance"]["used"]}
    assert used == {"a.jpg": "a photo of sks", "b@S C on the beach.jpg": "sks ball on the beach",
                    "c.jpg": "a painting of sks"}
    assert any(line.startswith('warning: instance_prompt "a photo of sks" does not name the '
                               'class "ball"') for line in lines)


def test_two_concepts_in_one_archive(tmp_path):
    import json

    archive = make_zip(tmp_path / "both.zip", {
        "dog/1.jpg": image_bytes((200, 0, 0)), "dog/2.jpg": image_bytes((190, 0, 0)),
        "cat/1.jpg": image_bytes((0, 0, 200)), "stray.jpg": image_bytes()})
    class_zip = make_zip(tmp_path / "classes.zip", {"cats/a.jpg": image_bytes((0, 0, 90))})
    concepts = json.dumps([
        {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog",
         "instance_data": "dog", "num_class_images": 2},
        {"instance_prompt": "a photo of zwx cat", "class_prompt": "a photo of a cat",
         "instance_data": "./cat/", "class_data": "cats", "num_class_images": 2}])
    out, lines = train_tiny(tmp_path, archive, concepts=concepts, class_data=str(class_zip),
                            max_train_steps=0, num_train_epochs=1)
    record = read_training_json(out)
    used = {(u["file"], u["caption"], u["concept"]) for u in record["dataset"]["instance"]["used"]}
    assert used == {("dog/1.jpg", "a photo of sks dog", 0), ("dog/2.jpg", "a photo of sks dog", 0),
                    ("cat/1.jpg", "a photo of zwx cat", 1)}
    classes = {(c["file"], c["caption"], c["concept"]) for c in record["dataset"]["class"]["used"]}
    assert classes == {("generated/0/0000.png", "a photo of a dog", 0),
                       ("generated/0/0001.png", "a photo of a dog", 0),
                       ("cats/a.jpg", "a photo of a cat", 1),
                       ("generated/1/0000.png", "a photo of a cat", 1)}
    assert len(record["history"]) == 4  # one epoch: max(2, 2) + max(1, 2) pairs, batch 1
    assert all(h["class_loss"] > 0 for h in record["history"])
    assert 'class images: 2 "a photo of a cat" (1 from class_data, 1 to generate)' in lines
    assert record["dataset"]["instance"]["skipped"] == [
        {"file": "stray.jpg", "reason": "outside every concept folder"}]


@pytest.mark.parametrize("concepts, message", [
    ("[{", "concepts is not valid JSON"),
    ('{"instance_data": "dog"}', "concepts must be a JSON list of objects"),
    ('[{"instance_data": "dog", "prompt": "x"}]', "concept 1: unknown key 'prompt'"),
    ('[{"instance_prompt": "a photo of sks dog"}]', "concept 1: instance_data must name a folder"),
    ('[{"instance_data": "dog", "class_data": "dogs"}]', "but no class_data archive was given"),
    ('[{"instance_data": "dog", "num_class_images": -1}]', "num_class_images must be a whole"),
    ('[{"instance_data": "dog", "class_data": {}}]', "class_data must name a folder"),
    ("[" * 100000, "concepts is not valid JSON"),
    # Unbounded work: each concept reads its folder of the archive, each class image is drawn.
    ("[" + ",".join(['{"instance_data": "dog"}'] * 10000) + "]",
     "concepts lists 10000 subjects; at most 100 train in one run"),
    ("[" + ",".join(['{"instance_data": "dog", "num_class_images": 2000}'] * 6) + "]",
     "concepts ask for 12000 class images in all; at most 10000"),
])
def test_bad_concepts_are_explained(concepts, message):
    from train import UserError

    with pytest.raises(UserError, match=message):
        TrainConfig(instance_data="x.zip", instance_prompt="a photo of sks dog",
                    class_prompt="a photo of a dog", concepts=concepts)


def test_a_concept_folder_without_images_is_named(tmp_path):
    from train import UserError

    archive = make_zip(tmp_path / "a.zip", {"dog/1.jpg": image_bytes()})
    with pytest.raises(UserError, match=r"instance_data folder 'cat': no files under cat/ in the "
                                        r"archive \(its top-level folders: dog/\)"):
        train_tiny(tmp_path, archive, concepts='[{"instance_data": "cat"}]')


def test_aspect_buckets_train_wide_and_tall_photos_uncropped(tmp_path):
    from train.data import bucket_sizes, nearest_bucket

    buckets = bucket_sizes(256)
    assert buckets == [(192, 320), (192, 384), (256, 256), (320, 192), (384, 192)]
    assert nearest_bucket((1600, 900), buckets) == (320, 192)  # 16:9 -> 5:3
    assert nearest_bucket((900, 1600), buckets) == (192, 320)
    archive = make_zip(tmp_path / "a.zip", {"wide.jpg": image_bytes(size=(512, 256)),
                                            "tall.jpg": image_bytes(size=(300, 500)),
                                            "square.jpg": image_bytes(size=(256, 256))})
    vae = build_builtin("tiny").vae
    images, _ = read_images(archive, "instance_data", "", 256)
    mean, _ = encode_images(vae, images, 256, True, seed=0, buckets=buckets)
    shapes = {e.file: tuple(m.shape[-2:]) for e, m in zip(images, mean)}  # latent [h, w]
    assert shapes == {"square.jpg": (32, 32), "wide.jpg": (24, 48), "tall.jpg": (40, 24)}

    out, _ = train_tiny(tmp_path, archive, aspect_buckets=True, resolution=256,
                        max_train_steps=4, num_class_images=1, class_infer_steps=1)
    history = read_training_json(out)["history"]
    assert len(history) == 4 and all(h["class_loss"] > 0 for h in history)


def test_a_run_removes_what_a_killed_run_left_in_its_work_dir(tmp_path, photos_zip):
    """A run killed outright (SIGKILL) leaves its work folder; the next run in the same work_dir
    removes it, and leaves a live process's alone."""
    import os
    import subprocess
    import sys

    from train import TrainConfig, run

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work = tmp_path / "work"
    left, alive = work / f"dreambooth-{dead.pid}-ab12", work / f"dreambooth-{os.getpid()}-x"
    for folder in (left, alive):
        folder.mkdir(parents=True)
        (folder / "unet.safetensors").write_bytes(b"\0" * 1024)
    lines = []
    run(TrainConfig(**dict(FAST, max_train_steps=1, with_prior_preservation=False),
                    instance_data=str(photos_zip), instance_prompt="a photo of sks ball",
                    output=str(tmp_path / "out.tar"), work_dir=str(work)), log=lines.append)
    assert sorted(p.name for p in work.iterdir()) == [alive.name]
    assert f"removed {left.name}, left by a run that was killed" in lines
