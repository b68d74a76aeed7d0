"""The Cog predictor, called as Cog calls it: setup() once, predict() with every input given,
files as Cog hands them over (fetched from a data: URI into a file of Cog's own)."""

import base64
import os
import tempfile

import pytest
import torch
from cog import Path as CogPath
from cog._inspector import create_predictor

from helpers import read_training_json, untar
from predict import Predictor


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """The predictor keeps its latest output in a temp folder: keep it inside the test's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def cog_defaults() -> dict:
    """Every input's default, as Cog fills them in (predict() called directly gets no defaults)."""
    return {name: field.default for name, field in create_predictor("predict", "Predictor")
            .inputs.items()}


def uploaded(path) -> CogPath:
    """A local file as it reaches predict() over HTTP: sent as a data: URI, which Cog's input
    handling (the same Path.validate and convert the server runs) writes to a temp file."""
    uri = "data:application/octet-stream;base64," + base64.b64encode(path.read_bytes()).decode()
    return CogPath.validate(uri).convert()


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_predict_trains_on_tiny_and_the_tarball_reloads(tmp_path, photos_zip, monkeypatch,
                                                        model):
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("BASE_MODEL", model)
    predictor = Predictor()
    predictor.setup()
    inputs = dict(cog_defaults(), instance_data=uploaded(photos_zip),
                  instance_prompt="a photo of sks ball", class_prompt="a photo of a ball",
                  resolution=64, num_class_images=2, class_infer_steps=2, max_train_steps=5,
                  learning_rate=1e-4, save_sample_prompt="a photo of sks ball",
                  n_save_sample=2, save_infer_steps=2, sample_batch_size=2)
    first = predictor.predict(**inputs)
    assert isinstance(first, CogPath) and first.name == "dreambooth-weights.tar"
    out = untar(first, tmp_path / "out")
    pipe = DiffusionPipeline.from_pretrained(out)
    image = pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
    record = read_training_json(out)
    assert record["config"]["model"] == model
    assert record["config"]["instance_data"] == str(inputs["instance_data"])
    assert record["config"]["adam_epsilon"] == 1e-8  # Cog defaults reached the config
    assert len(record["history"]) == 5
    assert len(list((out / "samples").iterdir())) == 2

    # A second prediction replaces the first output instead of piling up files.
    second = predictor.predict(**dict(inputs, instance_data=uploaded(photos_zip),
                                      max_train_steps=2, save_sample_prompt=None))
    assert second.exists() and sorted(p.name for p in second.parent.iterdir()) == [second.name]


def test_predict_refuses_bad_input_before_loading(tmp_path, monkeypatch):
    from train import UserError

    monkeypatch.setenv("BASE_MODEL", "tiny")
    predictor = Predictor()
    predictor.setup()
    empty = tmp_path / "empty.zip"
    empty.write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # a valid ZIP with no entries
    with pytest.raises(UserError, match="instance_data: the archive is empty"):
        predictor.predict(**dict(cog_defaults(), instance_data=uploaded(empty),
                                 instance_prompt="a photo of sks dog",
                                 class_prompt="a photo of a dog"))


@pytest.mark.parametrize("field", ["instance_data", "class_data", "base_checkpoint", "resume"])
def test_a_file_cog_did_not_fetch_is_refused_unread(tmp_path, photos_zip, monkeypatch, field):
    """A path that reached predict() as it was typed, not as a download of Cog's, names a file
    of the server: refused, whether it exists or not, before anything reads it."""
    from train import UserError

    monkeypatch.setenv("BASE_MODEL", "tiny")
    predictor = Predictor()
    predictor.setup()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it to read would block: the test would hang, not fail
    message = (f"{field}: send the file itself, as an http(s) URL or a data: URI; the server "
               "does not read files by their path on the server")
    for named in (str(photos_zip), CogPath(photos_zip), str(tmp_path), str(fifo),
                  str(tmp_path / "missing.zip"), "file://" + str(photos_zip)):
        inputs = dict(cog_defaults(), instance_prompt="a photo of sks ball",
                      instance_data=uploaded(photos_zip))
        inputs[field] = named
        with pytest.raises(UserError) as refused:
            predictor.predict(**inputs)
        assert str(refused.value) == message, named


def test_setup_says_how_to_get_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("BASE_MODEL", str(tmp_path / "weights"))
    from train import UserError

    with pytest.raises(UserError, match="run script/download-weights"):
        Predictor().setup()


def test_predict_trains_a_lora_and_resumes_from_a_checkpoint_tarball(tmp_path, photos_zip,
                                                                    monkeypatch):
    import tarfile

    from helpers import train_tiny
    from safetensors.torch import load_file

    monkeypatch.setenv("BASE_MODEL", "tiny")
    predictor = Predictor()
    predictor.setup()
    settings = dict(instance_prompt="a photo of sks ball", class_prompt="a photo of a ball",
                    resolution=64, num_class_images=2, class_infer_steps=2, sample_batch_size=2,
                    use_lora=True, lora_rank=4, save_precision="fp32")
    # A LoRA run interrupted after 2 of 4 steps, on the command line's side...
    train_tiny(tmp_path, photos_zip, "cli", **dict(settings, max_train_steps=2,
                                                   checkpointing_steps=2))
    packed = tmp_path / "step.tar"
    with tarfile.open(packed, "w") as tar:
        tar.add(tmp_path / "cli-checkpoints" / "step-000002", arcname="step-000002")
    whole, _ = train_tiny(tmp_path, photos_zip, "whole", **dict(settings, max_train_steps=4))
    # ...finished by the Cog predictor from the uploaded checkpoint tarball.
    inputs = dict(cog_defaults(), **settings, instance_data=uploaded(photos_zip),
                  max_train_steps=4, resume=uploaded(packed))
    out = untar(predictor.predict(**inputs), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "lora", "lora.safetensors",
                                                     "training.json"]
    assert [h["step"] for h in read_training_json(out)["history"]] == [1, 2, 3, 4]
    a, b = load_file(out / "lora.safetensors"), load_file(whole / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_predict_evaluates_with_the_feature_models_the_environment_names(tmp_path, photos_zip,
                                                                         monkeypatch):
    from train import UserError

    monkeypatch.setenv("BASE_MODEL", "tiny")
    monkeypatch.chdir(tmp_path)  # no weights/ here: the default feature folders are missing
    inputs = dict(cog_defaults(), instance_data=uploaded(photos_zip),
                  instance_prompt="a photo of sks ball", class_prompt="a photo of a ball",
                  resolution=64, num_class_images=2, class_infer_steps=2, max_train_steps=2,
                  save_infer_steps=2, sample_batch_size=2, evaluate=True,
                  eval_prompts="a sks ball on the beach", eval_images_per_prompt=2)
    predictor = Predictor()
    predictor.setup()
    with pytest.raises(UserError, match="download-weights --eval"):
        predictor.predict(**inputs)
    monkeypatch.setenv("EVAL_DINO", "tiny")
    monkeypatch.setenv("EVAL_CLIP", "tiny")
    predictor.setup()
    inputs["instance_data"] = uploaded(photos_zip)  # Cog fetches each prediction's files anew
    out = untar(predictor.predict(**inputs), tmp_path / "out")
    report = (out / "evaluation.json").read_text()
    assert '"a sks ball on the beach"' in report and (out / "contact_sheet.png").is_file()
    assert read_training_json(out)["config"]["eval_dino"] == "tiny"
