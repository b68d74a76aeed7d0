"""Prior preservation's sources and prompts (train/prior.py), each tested for its effect: the
base model's own predictions as the prior (no class images), the class in other contexts
(prior_prompts) for class images and for that prior, class images with the base model's
predictions for those contexts on them, and the class images' guidance.
"""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from helpers import (FAST, image_bytes, make_zip, read_training_json, same_weights, train_tiny,
                     unet_weights)
from train import TrainConfig, families
from train.config import Concept
from train.data import Batch
from train.errors import UserError
from train.loop import dreambooth_loss, prior_prompts
from train.models import load_pipeline
from train.prior import class_caption, class_image_prompts, instance_prior_prompts

EXACT = dict(FAST, save_precision="fp32")
BALL = Concept("a photo of sks ball", "a photo of a ball", "", None, 4,
               ("a photo of a ball on grass",))


def test_class_caption_puts_the_class_in_place_of_the_subject():
    assert class_caption("a photo of sks ball on a red table", BALL) == \
        "a photo of a ball on a red table"
    # A caption that does not hold the instance prompt loses the identifier only.
    assert class_caption("sks ball, close up", BALL) == "ball, close up"
    assert class_caption("sks", BALL) == "a photo of a ball"
    assert class_caption("a photo of sksy ball", BALL) == "a photo of sksy ball"  # a word
    assert instance_prior_prompts(BALL, "a photo of sks ball") == [
        "a photo of a ball", "a photo of a ball on grass"]
    # a caption that says more: the bare class prompt joins the contexts
    assert instance_prior_prompts(BALL, "a photo of sks ball on a rug") == [
        "a photo of a ball on a rug", "a photo of a ball", "a photo of a ball on grass"]


def test_class_image_prompts_keep_half_on_the_class_and_run_through_the_contexts():
    assert class_image_prompts(BALL, 5) == ["a photo of a ball"] * 3 + \
        ["a photo of a ball on grass"] * 2
    many = Concept("a photo of sks ball", "a photo of a ball", "", None, 4,
                   ("a photo of a ball", "in snow", "on grass", "on sand"))
    assert class_image_prompts(many, 8) == ["a photo of a ball"] * 4 + \
        ["in snow", "in snow", "on grass", "on sand"]
    plain = Concept("a photo of sks ball", "a photo of a ball", "", None, 4)
    assert class_image_prompts(plain, 3) == ["a photo of a ball"] * 3
    # class_images+base_model: the base model keeps the contexts; the images are the class
    assert class_image_prompts(BALL, 5, contexts=False) == ["a photo of a ball"] * 5


def test_each_photo_is_kept_under_its_class_caption_and_one_drawn_context():
    # Photos 0 and 1 have contexts (prompts 5-7 after their class captions 3 and 4); photo 2
    # has none. A global batch of four rows over two processes, two rows each.
    data = SimpleNamespace(prior_index=[torch.tensor([3, 5, 6, 7]), torch.tensor([4, 5, 6, 7]),
                                        torch.tensor([2])],
                           prompt_len=torch.tensor([4, 4, 4, 4, 4, 9, 4, 4]))
    batch = Batch(groups=[], prompts=torch.tensor([0, 0]), length=4, n_instance=2,
                  instance=torch.tensor([0, 2, 1, 0]))
    draws = torch.rand(4, generator=torch.Generator().manual_seed(0))
    contexts = [[5, 6, 7][int(u * 3)] for u in draws.tolist()]
    assert contexts == [6, 7, 5, 5]  # row 1's photo has no contexts: its draw goes unused
    rows, prompts, length = prior_prompts(data, batch, torch.Generator().manual_seed(0), 0)
    assert rows.tolist() == [0, 1, 0] and prompts.tolist() == [3, 2, contexts[0]]
    rows, prompts, length = prior_prompts(data, batch, torch.Generator().manual_seed(0), 1)
    assert rows.tolist() == [0, 1, 0, 1] and prompts.tolist() == [4, 3, contexts[2],
                                                                   contexts[3]]
    # every process pads to the global batch's longest prompt: prompt 5, drawn for rank 1
    assert length == 9
    # On class images (class_images+base_model) only the contexts: the class images are
    # already the class under its prompt. Rows count from the process's first pair.
    rows, prompts, length = prior_prompts(data, batch, torch.Generator().manual_seed(0), 1,
                                          contexts_only=True)
    assert rows.tolist() == [0, 1] and prompts.tolist() == [contexts[2], contexts[3]]
    assert length == 9
    alone = Batch(groups=[], prompts=torch.tensor([0]), length=4, n_instance=1,
                  instance=torch.tensor([2]))  # a photo without contexts: no row at all
    rows, prompts, length = prior_prompts(data, alone, torch.Generator().manual_seed(0), 0,
                                          contexts_only=True)
    assert rows.tolist() == [] and prompts.tolist() == [] and length == 4
    # prompts at their full length (pad_tokens, or a T5 family): the contexts' too
    full = Batch(groups=[], prompts=torch.tensor([0, 0]), length=None, n_instance=2,
                 instance=torch.tensor([0, 2, 1, 0]))
    assert prior_prompts(data, full, torch.Generator().manual_seed(0), 1)[2] is None


def prediction_gap(folder, prompt: str, seed: int = 0) -> float:
    """RMS difference between the trained model's and the base model's predictions for
    `prompt` on fixed noisy latents: how far training moved what that prompt draws."""
    generator = torch.Generator().manual_seed(seed)
    noisy = torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([100, 400, 700, 950])
    outputs = []
    for pipe in (load_pipeline("tiny", "cpu"), load_pipeline(str(folder), "cpu")):
        ids = pipe.tokenizer([prompt] * 4, padding="max_length", return_tensors="pt").input_ids
        with torch.no_grad():
            states, _ = families.get("sd1").encode_text([pipe.text_encoder], [ids])
            outputs.append(pipe.unet(noisy, t, states).sample)
    return ((outputs[0] - outputs[1]) ** 2).mean().sqrt().item()


@pytest.mark.parametrize("lora", [False, True])
def test_the_base_model_prior_trains_toward_the_base_models_prediction(tmp_path, photos_zip,
                                                                       lora):
    settings = dict(EXACT, prior_source="base_model", use_lora=lora, max_train_steps=3,
                    learning_rate=1e-3 if lora else 1e-4)
    out, lines = train_tiny(tmp_path, photos_zip, **settings)
    record = read_training_json(out)
    history = record["history"]
    # Step 1: the trained model is still the base model, so the prior half is zero up to
    # rounding (LoRA: the adapters start at zero); afterwards it measures how far the class
    # moved.
    assert history[0]["class_loss"] < 1e-10
    assert history[-1]["class_loss"] > 1e-6
    assert record["dataset"]["class"]["used"] == [] and record["plan"]["class_images"] == 0
    assert any(line.startswith('prior: the base model\'s own predictions for "a photo of a ball"')
               for line in lines)
    assert not any(line.startswith("class images") for line in lines)  # none generated


def test_the_base_model_prior_keeps_the_class_where_training_moves_it(tmp_path, photos_zip):
    """The effect a user relies on: at a learning rate that moves the model a lot, the class
    prompt still draws what the base model drew, far more than without the prior."""
    settings = dict(EXACT, max_train_steps=30, learning_rate=1e-3)
    free, _ = train_tiny(tmp_path, photos_zip, "free", with_prior_preservation=False,
                         **settings)
    kept, _ = train_tiny(tmp_path, photos_zip, "kept", prior_source="base_model", **settings)
    moved, held = (prediction_gap(folder, "a photo of a ball") for folder in (free, kept))
    subject_moved, subject_held = (prediction_gap(folder, "a photo of sks ball")
                                   for folder in (free, kept))
    assert held < 0.5 * moved, (held, moved)
    # and the subject was still learned: its prompt moved about as far as without the prior
    assert subject_held > 0.5 * subject_moved, (subject_held, subject_moved)


@pytest.mark.parametrize("source", ["base_model", "class_images+base_model"])
def test_a_base_model_prior_run_resumes_bit_identical(tmp_path, photos_zip, source):
    settings = dict(EXACT, prior_source=source, max_train_steps=4, checkpointing_steps=2,
                    prior_prompts="a photo of a ball on grass\na photo of a ball in snow")
    whole, _ = train_tiny(tmp_path, photos_zip, "whole", **settings)
    resumed, _ = train_tiny(tmp_path, photos_zip, "again", **settings,
                            resume=str(tmp_path / "whole-checkpoints" / "step-000002"))
    assert same_weights(unet_weights(whole), unet_weights(resumed))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-buckets"])
def test_class_images_with_the_base_model_prior_for_their_contexts(tmp_path, photos_zip, lora):
    """class_images+base_model: the class images are all of the class prompt, each step's class
    rows are denoised again under a prior prompt toward the base model's prediction, and it
    trains full and LoRA, with the class rows in their own UNet batch when aspect buckets give
    the photos another shape. Its effect on the contexts needs a model that reads its prompts:
    tests/test_toy.py measures it in the toy world."""
    context = "a photo of a ball on grass"
    if lora:  # wide photos: instance and class latents differ in shape, two UNet batches
        photos_zip = make_zip(tmp_path / "wide.zip", {f"{i}.jpg": image_bytes(size=(96, 48))
                                                      for i in range(3)})
    out, lines = train_tiny(tmp_path, photos_zip, prior_source="class_images+base_model",
                            prior_prompts=context, use_lora=lora, aspect_buckets=lora,
                            **dict(EXACT, max_train_steps=3, num_class_images=4))
    record = read_training_json(out)
    assert {ex["caption"] for ex in record["dataset"]["class"]["used"]} == {"a photo of a ball"}
    assert 'class images: 4 "a photo of a ball" (0 from class_data, 4 to generate)' in lines
    assert "prior: each class image also kept under one of 1 prior_prompts by the base " \
        "model's own predictions (weight 0.5, class images 1)" in lines
    assert all(h["class_loss"] > 1e-3 for h in record["history"])  # the class images' own
    # Step 1: the model is still the base, so the context row's error is zero and the class
    # half's mean is half the class image's; the class image counts at prior_loss_weight (1),
    # the context row at context_loss_weight, apart.
    first = record["history"][0]
    assert first["loss"] - first["instance_loss"] == pytest.approx(2 * first["class_loss"],
                                                                   rel=1e-4)


def test_the_context_rows_are_weighted_apart_from_the_class_images():
    inst, cls = torch.zeros(1, 4), torch.ones(3, 4)  # a class image's row, then two contexts
    target = torch.tensor([[0.0] * 4, [3.0] * 4, [2.0] * 4])  # errors 1, 4 and 1
    total, instance, prior = dreambooth_loss(inst, inst, cls, target, 1.0, contexts=2,
                                             context_weight=0.5)
    assert instance == 0 and prior == pytest.approx(2.0)  # the class half's mean, reported
    assert total == pytest.approx(1.0 * 1 + 0.5 * (4 + 1) / 2)
    joint, _, _ = dreambooth_loss(inst, inst, cls, target, 1.0)  # base_model: one mean
    assert joint == pytest.approx(2.0)


def test_prior_prompts_vary_the_class_images_and_a_resume_keeps_their_captions(tmp_path,
                                                                               photos_zip):
    settings = dict(EXACT, num_class_images=4, checkpointing_steps=2,
                    prior_prompts="a photo of a ball on grass")
    whole, lines = train_tiny(tmp_path, photos_zip, "whole", **settings)
    captions = [ex["caption"] for ex in read_training_json(whole)["dataset"]["class"]["used"]]
    assert captions == ["a photo of a ball"] * 2 + ["a photo of a ball on grass"] * 2
    assert 'class images: 4 "a photo of a ball" and 1 prior_prompts (0 from class_data, 4 to ' \
        'generate)' in lines
    resumed, _ = train_tiny(tmp_path, photos_zip, "again", **settings,
                            resume=str(tmp_path / "whole-checkpoints" / "step-000002"))
    again = [ex["caption"] for ex in read_training_json(resumed)["dataset"]["class"]["used"]]
    assert again == captions
    assert same_weights(unet_weights(whole), unet_weights(resumed))


def class_image(tmp_path, name: str) -> Image.Image:
    return Image.open(tmp_path / f"{name}-checkpoints" / "step-000004" / "class_images" /
                      "generated" / "0000.png").convert("RGB")


def test_class_guidance_scale_draws_other_class_images(tmp_path, photos_zip):
    for name, scale in (("sharp", 7.5), ("own", 1.0)):
        train_tiny(tmp_path, photos_zip, name, class_guidance_scale=scale,
                   checkpointing_steps=4, **EXACT)
    sharp, own = (class_image(tmp_path, name) for name in ("sharp", "own"))
    assert sharp.tobytes() != own.tobytes()


def settings(**changes) -> TrainConfig:
    return TrainConfig(**{**FAST, "instance_data": "x.zip", "instance_prompt": "a photo of sks "
                          "ball", "class_prompt": "a photo of a ball", "output": "o.tar",
                          **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(prior_source="base_model", class_data="c.zip"),
     "class_data is not used with prior_source base_model"),
    (dict(prior_prompts="a\n" * 201), "prior_prompts holds 201 prompts; at most 200"),
    (dict(prior_prompts="x" * 1001), "prior_prompts line 1 is 1001 characters long"),
    (dict(concepts=json.dumps([{"instance_data": "a", "prior_prompts": "a photo"}])),
     "concept 1: prior_prompts must be a list of at most 200 prompts"),
    (dict(prior_source="lots"), "prior_source"),
    (dict(context_loss_weight=-1), "context_loss_weight"),
    (dict(prior_source="class_images+base_model"),
     "prior_source class_images+base_model keeps the class in the contexts of prior_prompts: "
     "give prior_prompts"),
])
def test_bad_prior_settings_are_refused_in_one_line(changes, message):
    with pytest.raises(UserError, match=re.escape(message)):
        settings(**changes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("lora", [False, True])
def test_the_base_model_prior_in_mixed_precision_on_gpu(tmp_path, photos_zip, precision, lora):
    """The frozen copy (full fine-tune) is held in the mixed precision, the LoRA's base is the
    same UNet under autocast: step 1's prior half is near zero, and the loss stays finite."""
    out, _ = train_tiny(tmp_path, photos_zip, prior_source="base_model", use_lora=lora,
                        mixed_precision=precision, gradient_checkpointing=True,
                        **dict(EXACT, max_train_steps=5))
    record = read_training_json(out)
    assert record["mixed_precision"] == precision
    history = record["history"]
    assert history[0]["class_loss"] < 1e-3
    assert all(h["loss"] is not None for h in history)
