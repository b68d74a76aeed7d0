"""Class images: the class_scheduler sampler is the one used, is accurate, and leaves the pipeline's
own scheduler (samples, export) untouched.

    .venv/bin/python -m pytest tests/test_class_images.py
"""

import json

import numpy as np
import pytest
import torch
from helpers import FAST, train_tiny

from train import UserError
from train.config import CLASS_SCHEDULERS, TrainConfig
from train.models import build_builtin
from train.sampling import SAMPLERS, generate, sampler

SETTINGS = dict(batch_size=2, guidance=7.5, seed=0, resolution=64, log=lambda _: None)


@pytest.fixture(scope="module")
def pipe():
    pipe = build_builtin("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_class_scheduler_names_a_sampler_of_the_models_noise_schedule():
    from train.generate import SCHEDULERS  # the generator's, by Replicate's names

    assert set(CLASS_SCHEDULERS) <= set(SAMPLERS) | {"base"}
    assert set(SCHEDULERS.values()) | set(CLASS_SCHEDULERS) == set(SAMPLERS) | {"base"}
    for model, prediction in (("tiny", "epsilon"), ("tiny-sd2", "v_prediction")):
        pipe = build_builtin(model)
        assert sampler(pipe, "base") is pipe.scheduler
        for name, (cls, _) in SAMPLERS.items():
            made = sampler(pipe, name)
            assert type(made).__name__ == cls
            assert made.config.prediction_type == prediction
            torch.testing.assert_close(made.betas, pipe.scheduler.betas, rtol=0, atol=0)
    assert sampler(pipe, "dpm++").config.algorithm_type == "dpmsolver++"
    assert sampler(pipe, "ddim").config.clip_sample is False  # latents are not in [-1, 1]


def test_generate_uses_the_given_sampler_and_puts_the_pipelines_own_back(pipe):
    own, index = pipe.scheduler, dict(pipe.config)
    dpm = sampler(pipe, "dpm++")
    with_dpm = generate(pipe, "a photo of a ball", 2, steps=3, scheduler=dpm, **SETTINGS)
    assert len(dpm.timesteps) == 3 and dpm.step_index == 3  # it ran every step
    assert pipe.scheduler is own and dict(pipe.config) == index
    with_own = generate(pipe, "a photo of a ball", 2, steps=3, **SETTINGS)
    assert not np.array_equal(np.asarray(with_dpm[0]), np.asarray(with_own[0]))
    with pytest.raises(ValueError):  # a failing call puts it back too
        generate(pipe, "a photo of a ball", 1, steps=3, scheduler=sampler(pipe, "euler"),
                 **dict(SETTINGS, resolution=60))
    assert pipe.scheduler is own and dict(pipe.config) == index


def test_dpm_solver_in_25_steps_is_closer_to_the_exact_sample_than_pndm_in_50(pipe):
    """All samplers approximate the same sampling ODE from the same noise; DDIM at 100 steps
    stands in for its exact solution (at 200 steps it moves by 0.5 %)."""
    def latents(scheduler, steps):
        pipe.scheduler, own = scheduler, pipe.scheduler
        try:
            with torch.no_grad():
                return pipe("a photo of a ball", num_inference_steps=steps, guidance_scale=7.5,
                            height=64, width=64, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).images
        finally:
            pipe.scheduler = own

    exact = latents(sampler(pipe, "ddim"), 100)

    def error(x):
        return float((x - exact).norm() / exact.norm())

    dpm_25, pndm_50 = error(latents(sampler(pipe, "dpm++"), 25)), error(latents(pipe.scheduler, 50))
    assert dpm_25 < 0.05 and dpm_25 < pndm_50 / 3, (dpm_25, pndm_50)


def test_class_images_are_made_by_the_class_scheduler_and_the_export_keeps_the_base_one(
        tmp_path, photos_zip):
    out, _ = train_tiny(tmp_path, photos_zip, checkpointing_steps=FAST["max_train_steps"])
    record = json.loads((out / "training.json").read_text())["config"]
    assert record["class_scheduler"] == "dpm++"
    stored = sorted((tmp_path / "run-checkpoints").glob("step-*/class_images/generated/*.png"))
    assert len(stored) == FAST["num_class_images"]
    base = build_builtin("tiny")
    base.set_progress_bar_config(disable=True)
    settings = dict(SETTINGS, seed=record["seed"], steps=FAST["class_infer_steps"])
    with_dpm = generate(base, "a photo of a ball", len(stored), scheduler=sampler(base, "dpm++"),
                        **settings)
    with_pndm = generate(base, "a photo of a ball", len(stored), **settings)
    from PIL import Image

    for path, dpm, pndm in zip(stored, with_dpm, with_pndm):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(pixels, np.asarray(dpm))
        assert not np.array_equal(pixels, np.asarray(pndm))
    # The exported pipeline samples with the base model's scheduler, as it came.
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == [
        "diffusers", "PNDMScheduler"]
    base.scheduler.save_config(tmp_path / "base-scheduler")
    assert (json.loads((out / "scheduler" / "scheduler_config.json").read_text())
            == json.loads((tmp_path / "base-scheduler" / "scheduler_config.json").read_text()))


def test_an_unknown_class_scheduler_is_refused():
    with pytest.raises(UserError, match="class_scheduler must be one of dpm\\+\\+, base, ddim, "
                                        "euler \\(got 'plms'\\)"):
        TrainConfig(instance_data="x.zip", instance_prompt="a photo of sks dog",
                    class_prompt="a photo of a dog", class_scheduler="plms")
