"""Checkpoints and resume: a training process killed with SIGKILL and resumed ends bit-identical to
one never interrupted (SD 1.x and FLUX); bad resumes are refused; a diverging loss stops with
the checkpoint kept.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST, train_tiny, unet_weights
from train import TrainConfig, UserError, run

# Full fine-tune of UNet and text encoder with prior preservation, saved in fp32 so that the
# comparison is exact.
SETTINGS = dict(FAST, max_train_steps=12, save_precision="fp32", train_text_encoder=True,
                use_ema=True, flip_p=0.5)


def weights(folder) -> dict:
    """Every trained part's tensors (the UNet or transformer, the text encoders), by part."""
    return {f"{path.parent.name}.{k}": v for path in sorted(folder.glob("*/*.safetensors"))
            if path.parent.name != "vae" for k, v in load_file(path).items()}


def cli(photos_zip, output, *flags, settings=SETTINGS):
    args = [sys.executable, "-m", "train", "--instance-data", str(photos_zip),
            "--instance-prompt", "a photo of sks ball", "--class-prompt", "a photo of a ball",
            "--output", str(output)]
    for name, value in settings.items():
        args += ["--" + name.replace("_", "-"), str(value).lower() if isinstance(value, bool)
                 else str(value)]
    return args + list(flags)


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_killed_run_resumes_bit_identical(tmp_path, photos_zip, venv_env, model):
    settings = dict(SETTINGS, model=model)
    whole, _ = train_tiny(tmp_path, photos_zip, "whole", **settings)

    output = tmp_path / "killed.tar"
    ckpts = tmp_path / "killed-checkpoints"
    child = subprocess.Popen(cli(photos_zip, output, "--checkpointing-steps", "4",
                                 "--checkpoints-total-limit", "0", "--log-every", "1",
                                 settings=settings),
                             cwd=tmp_path, env=venv_env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in child.stdout:  # kill it mid-way between the second and third checkpoint
        seen.append(line)
        if line.startswith("step 10/12"):
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "".join(seen)
    assert not output.exists()
    assert [p.name for p in sorted(ckpts.iterdir())] == ["step-000004", "step-000008"]
    # A kill while a checkpoint was being written leaves a .partial folder: it is never used.
    (ckpts / "step-000012.partial").mkdir()
    (ckpts / "step-000012.partial" / "state.json").write_text("{}")

    resumed, lines = train_tiny(tmp_path, photos_zip, "killed", resume=str(ckpts),
                                checkpointing_steps=4, **settings)
    assert any("from step 8" in line for line in lines)
    # The class images come from the checkpoint: none generated again.
    assert not [line for line in lines if re.match(r"class images: \d+/\d+", line)]
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((resumed / "training.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 13))
    # The .partial folder is cleaned away; the default limit keeps the latest two.
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000008", "step-000012"]


def test_resume_from_a_tarball_and_the_limit_keeps_the_latest(tmp_path, photos_zip):
    settings = dict(SETTINGS, max_train_steps=6, checkpointing_steps=2,
                    checkpoints_total_limit=2)
    whole, _ = train_tiny(tmp_path, photos_zip, "whole", **settings)
    ckpts = tmp_path / "whole-checkpoints"
    assert [p.name for p in sorted(ckpts.iterdir())] == ["step-000004", "step-000006"]
    packed = tmp_path / "step4.tar"
    with tarfile.open(packed, "w") as tar:
        tar.add(ckpts / "step-000004", arcname="step-000004")
    resumed, _ = train_tiny(tmp_path, photos_zip, "again", resume=str(packed), **settings)
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_or_images(tmp_path, photos_zip):
    train_tiny(tmp_path, photos_zip, "first", **dict(SETTINGS, max_train_steps=2,
                                                      checkpointing_steps=2))
    ckpts = str(tmp_path / "first-checkpoints")
    base = dict(FAST, **SETTINGS, instance_data=str(photos_zip), output=str(tmp_path / "x.tar"),
                instance_prompt="a photo of sks ball", class_prompt="a photo of a ball",
                resume=ckpts)
    lines = []
    with pytest.raises(UserError, match=r"other settings \(learning_rate 0.0001 -> 0.001"):
        run(TrainConfig(**dict(base, learning_rate=1e-3)), log=lines.append)
    from train.example_data import write_example_zip

    other = write_example_zip(tmp_path / "other.zip", count=3, size=64)
    with pytest.raises(UserError, match="training images differ"):
        run(TrainConfig(**dict(base, instance_data=str(other))), log=lines.append)
    with pytest.raises(UserError, match="no checkpoint in"):
        run(TrainConfig(**dict(base, resume=str(tmp_path))), log=lines.append)
    assert lines == []  # refused before any work
    # Longer training may be asked for when resuming.
    more, lines = train_tiny(tmp_path, photos_zip, "more",
                             **dict(SETTINGS, resume=ckpts, max_train_steps=4))
    assert any("from step 2" in line for line in lines)


def test_a_diverging_loss_stops_and_names_the_cause(tmp_path, photos_zip):
    with pytest.raises(UserError, match=r"training diverged at step \d+ .*learning rate 1.0e\+00 "
                                        r"is likely too high.*last good checkpoint is kept"):
        train_tiny(tmp_path, photos_zip, "nan", **dict(
            FAST, max_train_steps=200, learning_rate=1.0, max_grad_norm=0.0,
            checkpointing_steps=1, checkpoints_total_limit=1))
    kept = list((tmp_path / "nan-checkpoints").iterdir())
    assert len(kept) == 1
    saved = load_file(kept[0] / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "nan.tar").exists()
    assert list((tmp_path / "nan-work").iterdir()) == []


def test_samples_during_training_leave_the_weights_alone(tmp_path, photos_zip):
    settings = dict(FAST, save_precision="fp32", save_sample_prompt="a photo of sks ball",
                    n_save_sample=1, save_infer_steps=2)
    plain, _ = train_tiny(tmp_path, photos_zip, "plain", **settings)
    sampled, _ = train_tiny(tmp_path, photos_zip, "sampled", sample_every=2, **settings)
    record = json.loads((sampled / "training.json").read_text())
    assert record["samples"] == ["samples/sample-000.png", "samples/step-000002/sample-000.png"]
    assert (sampled / "samples" / "step-000002" / "sample-000.png").is_file()
    a, b = unet_weights(plain), unet_weights(sampled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="sample_every renders the sample prompt"):
        TrainConfig(**dict(FAST, instance_data="x.zip", instance_prompt="a",
                           class_prompt="b", sample_every=2))


def test_checkpoint_dir_must_be_writable(tmp_path, photos_zip):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write"):
        run(TrainConfig(**dict(FAST, instance_data=str(photos_zip), instance_prompt="a photo",
                               class_prompt="a", output=str(tmp_path / "o.tar"),
                               checkpointing_steps=2, checkpoint_dir=str(blocker / "ckpt"))),
            log=lambda _: None)
    assert sorted(os.listdir(tmp_path)) == ["file", "photos.zip"]  # nothing written


class NotATensor:
    """What a hostile checkpoint pickles in place of an optimizer state."""


@pytest.fixture(scope="module")
def step2(tmp_path_factory, photos):
    """A real checkpoint (step 2 of a run), to make hostile copies of."""
    tmp = tmp_path_factory.mktemp("step2")
    train_tiny(tmp, photos, "first", **dict(SETTINGS, max_train_steps=2, checkpointing_steps=2))
    return tmp / "first-checkpoints" / "step-000002"


def hostile(step2, tmp_path, case: str):
    """A tarball of the checkpoint, spoiled as `case` says; returns its path."""
    import gzip
    import io
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "ckpt" / "step-000002"
    shutil.copytree(step2, folder)
    if case == "pickle":
        torch.save({"state": NotATensor()}, folder / "optimizer.pt")
    if case == "other model":
        save_file({name: torch.zeros(3) for name in load_file(folder / "trainable.safetensors")},
                  folder / "trainable.safetensors")
    if case == "bad state":
        (folder / "state.json").write_text("[]")
    packed = tmp_path / ("ckpt.tar.gz" if case == "bomb" else "ckpt.tar")
    with (gzip.open(packed, "wb", compresslevel=1) if case == "bomb"
          else open(packed, "wb")) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        if case == "bomb":  # state.json, then 256 MiB of zeros in 256 KiB
            tar.add(folder / "state.json", arcname="step-000002/state.json")
        else:
            tar.add(folder, arcname="step-000002")
        if case == "escape":
            data = b"owned"
            info = tarfile.TarInfo("../escaped.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if case == "link":
            info = tarfile.TarInfo("step-000002/passwd")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        if case == "bomb":
            info = tarfile.TarInfo("step-000002/padding.bin")
            info.size = 256 << 20
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    if case == "truncated":
        with open(packed, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
    return packed


@pytest.mark.parametrize("case, message", [
    ("truncated", r"resume: ckpt.tar is a damaged tar archive"),
    ("escape", r"resume: ckpt.tar holds a path outside its folder \('../escaped.txt'\)"),
    ("link", r"resume: ckpt.tar holds a link \('step-000002/passwd'\)"),
    ("bomb", r"resume: ckpt.tar.gz (expands|would expand)"),
    ("bad state", r"resume: the state.json of .* is not one this trainer wrote"),
    ("pickle", r"resume: the checkpoint's optimizer.pt holds objects, not only tensors"),
    ("other model", r"resume: the checkpoint's weights do not fit this model .*is \(3,\), not"),
])
def test_a_hostile_checkpoint_tarball_is_refused_in_one_line(step2, photos, tmp_path, case,
                                                             message):
    """Each of these ended in a traceback (or filled the disk); now one line, nothing written
    outside the work folder, and the work folder removed."""
    work = tmp_path / "work"
    config = TrainConfig(**dict(SETTINGS, max_train_steps=4), instance_data=str(photos),
                         instance_prompt="a photo of sks ball", class_prompt="a photo of a ball",
                         resume=str(hostile(step2, tmp_path, case)),
                         output=str(tmp_path / "out.tar"), work_dir=str(work))
    with pytest.raises(UserError, match=message) as refused:
        run(config, log=lambda line: None)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out.tar").exists()
    assert list(work.iterdir()) == [] if work.exists() else True
