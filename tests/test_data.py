"""Image preparation and generation settings, on real tensors and the real tiny pipeline."""

import random

import torch
from PIL import Image

from train.data import epoch_batches, epoch_pairs, image_tensor
from train.intake import Example
from train.models import build_builtin
from train.sampling import generate


def left_red_right_blue(width=96, height=64):
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


def test_center_crop_takes_the_middle():
    pixels = image_tensor(left_red_right_blue(), 64, center_crop=True, rng=random.Random(0))
    assert pixels.shape == (3, 64, 64)
    # 96 wide -> columns 16..80 kept: half red, half blue, split in the middle.
    assert pixels[0, :, :32].mean() == 1.0 and pixels[2, :, 32:].mean() == 1.0


def test_random_crops_vary_and_stay_inside():
    crops = {tuple(image_tensor(left_red_right_blue(), 64, False, random.Random(s))[0, 0]
                   .tolist()) for s in range(20)}
    assert len(crops) > 3  # different offsets
    small = image_tensor(Image.new("RGB", (40, 30), "white"), 64, False, random.Random(0))
    assert small.shape == (3, 64, 64) and small.min() == 1.0  # upscaled, never padded


def examples(*concepts):
    return [Example(f"{i}.jpg", "c", (8, 8), None, concept=k) for i, k in enumerate(concepts)]


def test_batches_cover_every_pair_each_epoch():
    pairs = epoch_pairs(examples(0, 0, 0), examples(0, 0, 0, 0, 0))
    batches = epoch_batches(pairs, 2, torch.Generator().manual_seed(0))
    assert len(batches) == 3  # ceil(5 / 2)
    inst, cls = [], []
    for i, c in batches:
        inst += i
        cls += c
    assert sorted(cls) == [0, 1, 2, 3, 4]  # every class image once
    assert sorted(set(inst)) == [0, 1, 2] and len(inst) == 5  # instances repeat to match


def test_pairs_stay_within_a_concept():
    instance, classes = examples(0, 0, 1), examples(1, 0, 1, 1)
    pairs = epoch_pairs(instance, classes)
    assert all(instance[i].concept == classes[c].concept for i, c in pairs)
    assert len(pairs) == 2 + 3  # concept 0: max(2, 1); concept 1: max(1, 3)
    assert epoch_pairs(instance, []) == [(0, None), (1, None), (2, None)]


def test_generation_settings_act():
    pipe = build_builtin("tiny")
    pipe.set_progress_bar_config(disable=True)

    def make(**kw):
        settings = dict(batch_size=2, steps=2, guidance=7.5, seed=1, resolution=64,
                        log=lambda _: None)
        images = generate(pipe, "a photo of sks dog", 3, **{**settings, **kw})
        return [torch.tensor(list(im.getdata())) for im in images]

    base = make()
    assert len(base) == 3 and all(im.shape == (64 * 64, 3) for im in base)
    assert all(torch.equal(a, b) for a, b in zip(base, make()))  # seeded
    for change in (dict(guidance=1.0), dict(steps=3), dict(seed=2),
                   dict(negative_prompt="blurry")):
        assert not torch.equal(base[0], make(**change)[0]), change
    lines = []
    make(log=lines.append)
    assert [line.split()[1] for line in lines] == ["2/3", "3/3"]  # batches of batch_size
