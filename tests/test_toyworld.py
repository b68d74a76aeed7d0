"""The toy world and its scorers: scenes come out as asked, and the scorers read them back.

    .venv/bin/python -m pytest tests/test_toyworld.py -q      # about 20 s

Every check runs on scenes generated fresh here, with a seed the scorers' training never used.
"""

from __future__ import annotations

import numpy as np
import pytest

from toy import score as toyscore
from toy import world


def test_scenes_have_what_they_say():
    rng = np.random.default_rng(7)
    for _ in range(50):
        scene = world.random_scene(rng)
        image = np.asarray(world.render(scene))
        assert image.shape == (world.SIZE, world.SIZE, 3)
        colours = {tuple(p) for p in image.reshape(-1, 3)}
        # hard edges: exactly the background and the shape colour, border all background
        assert colours == {world.PALETTE[scene.background], world.PALETTE[scene.colour]}
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert {tuple(p) for p in border} == {world.PALETTE[scene.background]}
        assert scene.colour != scene.background
        assert (scene.shape, scene.colour, scene.background) not in world.HELD_OUT


def test_images_are_drawn_in_pixel_blocks_and_collages_are_no_scenes():
    rng = np.random.default_rng(11)
    images = [np.asarray(world.render(world.random_scene(rng))) for _ in range(10)]
    collages = [np.asarray(world.collage(rng)) for _ in range(40)]
    palette = {tuple(c) for c in world.PALETTE.values()}
    for image in images + collages:
        blocks = image[::world.PIXEL, ::world.PIXEL]
        assert (image == blocks.repeat(world.PIXEL, 0).repeat(world.PIXEL, 1)).all()
        assert {tuple(p) for p in image.reshape(-1, 3)} <= palette
    # collages show more than a scene can: three colours or more in most of them
    many = [len({tuple(p) for p in c.reshape(-1, 3)}) >= 3 for c in collages]
    assert sum(many) >= 30


def test_held_out_combinations_are_drawn_only_on_request():
    rng = np.random.default_rng(8)
    held = [world.random_scene(rng, held_out="only") for _ in range(30)]
    assert all((s.shape, s.colour, s.background) in world.HELD_OUT for s in held)
    with pytest.raises(ValueError):
        world.random_scene(rng, "circle", "green", "yellow")  # held out from pretraining
    # every attribute value, and every pair of them, still occurs in pretraining scenes
    seen = {(s.shape, s.colour, s.background)
            for s in (world.random_scene(rng) for _ in range(3000))}
    for a, b in ((0, 1), (0, 2), (1, 2)):
        pairs = {(c[a], c[b]) for c in world.HELD_OUT}
        assert pairs <= {(c[a], c[b]) for c in seen}


def test_captions():
    assert world.caption("star", "red", "blue") == "a photo of a red star on a blue background"
    assert world.caption("star", None, "blue") == "a photo of a star on a blue background"
    assert world.caption("star") == "a photo of a star"
    assert world.caption("circle", None, "green", identifier="sks") == \
        "a photo of sks circle on a green background"


def test_subject_looks_unlike_any_world_shape():
    rng = np.random.default_rng(9)
    image = np.asarray(world.render(world.subject_scene(rng, "blue")))
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert colours == {world.PALETTE["blue"], world.PALETTE[world.SUBJECT["colour"]],
                       world.PALETTE[world.SUBJECT["core"]]}


@pytest.mark.parametrize("degraded", [False, True])
def test_scorers_are_right_on_fresh_scenes(degraded):
    accuracy = toyscore.accuracy(n=400, seed=2024, degraded=degraded)
    assert accuracy["background"] == 1.0
    assert accuracy["colour"] >= 0.99
    assert accuracy["shape"] >= 0.97
    assert accuracy["subject"] >= 0.99


def test_subject_detector_needs_both_core_and_rim():
    rng = np.random.default_rng(10)
    subject = world.subject_scene(rng, "green")
    plain = world.Scene("circle", world.SUBJECT["colour"], "green", subject.radius, subject.cx,
                        subject.cy)
    white = world.Scene("circle", world.SUBJECT["core"], "green", subject.radius, subject.cx,
                        subject.cy)
    # on a background of the core's colour the core is a hole in the shape, still the subject
    on_core = world.subject_scene(rng, world.SUBJECT["core"])
    got = toyscore.score([world.render(s) for s in (subject, plain, white, on_core)])
    assert [g["subject"] for g in got] == [True, False, False, True]
    assert got[0]["shape"] == "circle" and got[0]["colour"] == world.SUBJECT["colour"]
