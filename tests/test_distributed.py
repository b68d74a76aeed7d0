"""Training on several processes: two CPU processes over gloo, started by torchrun as a user
would (`ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m train ...`), against
one process with the same global batch; a rank killed mid-run; the Cog predictor launching
the processes itself.
"""

import os
import re
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST, ROOT, read_training_json, train_tiny, unet_weights, untar
from train import TrainConfig, UserError
from train.checkpoint import check_resumable
from train.cli import build_parser, to_argv
from train.data import epoch_batches
from train.distributed import command, share
from train.models import build_builtin

RUN = ["--model", "tiny", "--instance-prompt", "a photo of sks ball",
       "--class-prompt", "a photo of a ball", "--resolution", "64", "--num-class-images", "3",
       "--class-infer-steps", "2", "--learning-rate", "1e-4", "--save-precision", "fp32"]


def torchrun(args: list[str], tmp_path, **popen) -> subprocess.Popen:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(command(2, args), env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_each_process_takes_its_share():
    assert [share(r, 7, 3) for r in range(3)] == [range(0, 3), range(3, 5), range(5, 7)]
    assert [len(share(r, 1, 2)) for r in range(2)] == [1, 0]
    # full batches for several processes: the last one topped up from the start of the epoch
    batches = epoch_batches([(i, i) for i in range(5)], 4, torch.Generator().manual_seed(0),
                            fill=True)
    assert [len(i) for i, _ in batches] == [4, 4]
    firsts = batches[0][0]
    assert batches[1][0][1:] == firsts[:3]
    assert sorted(set(firsts + batches[1][0])) == list(range(5))


def test_a_config_goes_through_the_command_line_unchanged(tmp_path):
    config = TrainConfig(**FAST, instance_data="x.zip", instance_prompt="a photo of sks ball",
                         class_prompt="a photo of a ball", output="o.tar", use_lora=True,
                         train_text_encoder=False, eval_prompts="one\ntwo", adam_epsilon=1e-7,
                         output_format="lora,diffusers")
    argv = to_argv(config)
    assert "--train-text-encoder" in argv and "--adam-beta1" not in argv  # defaults left out
    assert TrainConfig(**vars(build_parser().parse_args(argv))) == config


# The base model's prior draws a prior prompt per row of the global batch: the same in both,
# on the photos' rows (base_model) or on the class images' (class_images+base_model, which
# trains on class images as the plain class_images prior does, plus those rows).
# FLUX: its CLIP-L trains (train_text_encoder's default) and its T5 does not: only the trained
# encoders are wrapped by DDP.
PRIORS = [dict(prior_source=source, prior_prompts="a photo of a ball on grass")
          for source in ("class_images+base_model", "base_model")]
# With fsdp the trained models (FLUX's transformer and CLIP-L) are sharded, not copied; that
# run also checkpoints at step 2, and resumes from there.
CASES = [dict(model="tiny", **PRIORS[0]), dict(model="tiny", **PRIORS[1]),
         dict(model="tiny-flux", **PRIORS[1]), dict(model="tiny-flux", fsdp=True, **PRIORS[1])]


@pytest.mark.parametrize("prior", CASES, ids=lambda c: f"{c['model']}-{c['prior_source']}"
                         + ("-fsdp" if c.get("fsdp") else ""))
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, photos_zip, prior):
    """2 processes x train_batch_size 1 against 1 process x 2: the same batches, class images,
    noise and timesteps; only the order of floating-point sums differs."""
    flags = [x for k, v in prior.items()
             for x in ("--" + k.replace("_", "-"), str(v).lower() if v is True else v)]
    ckpt = ["--checkpointing-steps", "2", "--checkpoint-dir", str(tmp_path / "two-ckpt")]
    child = torchrun(RUN[2:] + flags + [
        "--instance-data", str(photos_zip), "--max-train-steps", "4",
        "--output", str(tmp_path / "two.tar"), "--work-dir", str(tmp_path / "work")]
        + (ckpt if prior.get("fsdp") else []), tmp_path)
    log = child.communicate(timeout=600)[0]
    assert child.returncode == 0, log
    if prior.get("fsdp"):
        check_sharded_checkpoint(tmp_path, RUN[2:] + flags + [
            "--instance-data", str(photos_zip), "--max-train-steps", "4",
            "--work-dir", str(tmp_path / "work")])
    one, _ = train_tiny(tmp_path, photos_zip, name="one", num_class_images=3,
                        save_precision="fp32", train_batch_size=2, **prior)
    two = untar(tmp_path / "two.tar", tmp_path / "two")
    assert list((tmp_path / "work").iterdir()) == []  # every process cleaned up
    # rank 0 alone logs: one summary, one line per step
    assert log.count("dataset: 4 instance images") == 1 and log.count("step 4/4") == 1
    assert "x 2 processes" in log
    record = read_training_json(two)
    weights = record["processes"]["weights"]
    if prior.get("fsdp"):  # each process held half the trained weights, rank 0 gathered them
        assert record["processes"]["sharded"] == ["text_encoder", "transformer"]
        assert "fsdp: the transformer, text_encoder sharded across 2 processes" in log
        assert "view tensor" not in log and len(weights) == 1
        held, total = (int(n.replace(",", "")) for n in re.search(
            r"processes: ([\d,]+) of the ([\d,]+) trained", log).groups())
        assert total / 2 <= held < total / 2 + 1000, (held, total)  # half, and padding
    else:
        assert record["processes"]["count"] == 2 and len(weights) == 2
        assert weights[0] == weights[1] and record["processes"]["sharded"] == []
    assert record["plan"]["effective_batch"] == 2
    assert [c["file"] for c in record["dataset"]["class"]["used"]] == \
        [c["file"] for c in read_training_json(one)["dataset"]["class"]["used"]]
    # equal losses: the same class images (each has its own seed), batches, noise, timesteps
    losses = [[h["loss"] for h in read_training_json(f)["history"]] for f in (one, two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    part = "unet" if prior["model"] == "tiny" else "transformer"
    start = getattr(build_builtin(prior["model"]), part).state_dict()
    a, b = (load_file(f / part / "diffusion_pytorch_model.safetensors") for f in (one, two))
    moved = sum(float((a[k] - start[k]).norm() ** 2) for k in a) ** 0.5
    apart = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    # Measured: apart/moved = 0.004 (4 steps at lr 1e-4; Adam magnifies rounding in
    # near-zero gradients). Different batches would be ~1.
    assert moved > 0 and apart / moved < 0.02, (apart, moved)


def test_a_killed_process_fails_the_run_cleanly_and_it_resumes(tmp_path, photos_zip):
    ckpt = tmp_path / "ckpt"
    args = RUN + ["--instance-data", str(photos_zip), "--checkpointing-steps", "2",
                  "--checkpoint-dir", str(ckpt), "--work-dir", str(tmp_path / "work")]
    child = torchrun(args + ["--max-train-steps", "400", "--output", str(tmp_path / "k.tar")],
                     tmp_path)
    deadline = time.time() + 300
    while not (ckpt / "step-000002").is_dir():
        assert child.poll() is None and time.time() < deadline, child.communicate()[0]
        time.sleep(0.2)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(child.pid)],
                                              capture_output=True, text=True).stdout.split()]
    rank1 = next(p for p in workers
                 if b"RANK=1\0" in open(f"/proc/{p}/environ", "rb").read().replace(
                     b"LOCAL_RANK=1\0", b""))
    os.kill(rank1, signal.SIGKILL)
    log = child.communicate(timeout=120)[0]
    assert child.returncode != 0
    assert not (tmp_path / "k.tar").exists()
    assert not list(tmp_path.glob("k.tar*"))  # no half-written tarball either
    assert list((tmp_path / "work").iterdir()) == [], log  # rank 0 removed its work folder
    saved = sorted(p.name for p in ckpt.iterdir())
    assert saved and all(not n.endswith(".partial") for n in saved), saved

    # Resumed on two processes from step 2, it ends where an uninterrupted run does.
    step2 = ckpt / "step-000002"
    keep = tmp_path / "kept-step-2"
    step2.rename(keep)
    child = torchrun(args + ["--max-train-steps", "4", "--resume", str(keep),
                             "--checkpoint-dir", str(tmp_path / "c2"),
                             "--output", str(tmp_path / "resumed.tar")], tmp_path)
    log = child.communicate(timeout=600)[0]
    assert child.returncode == 0, log
    assert "resume:" in log and "from step 2" in log
    child = torchrun(args + ["--max-train-steps", "4", "--checkpoint-dir", str(tmp_path / "c3"),
                             "--output", str(tmp_path / "straight.tar")], tmp_path)
    log = child.communicate(timeout=600)[0]
    assert child.returncode == 0, log
    a = unet_weights(untar(tmp_path / "resumed.tar", tmp_path / "r"))
    b = unet_weights(untar(tmp_path / "straight.tar", tmp_path / "s"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def check_sharded_checkpoint(tmp_path, args: list[str]) -> None:
    """A sharded run's checkpoint (tmp_path/two-ckpt, its run's tarball two.tar) holds every
    weight and AdamW moment whole, as an unsharded run's does, and a run resumed from it on two
    processes ends exactly where the uninterrupted one did."""
    step2 = tmp_path / "two-ckpt" / "step-000002"
    child = torchrun(args + ["--resume", str(step2), "--checkpoint-dir", str(tmp_path / "c2"),
                             "--checkpointing-steps", "2", "--output",
                             str(tmp_path / "resumed.tar")], tmp_path)
    log = child.communicate(timeout=600)[0]
    assert child.returncode == 0, log
    assert "resume:" in log and "from step 2" in log
    weights = load_file(step2 / "trainable.safetensors")
    start = build_builtin("tiny-flux")
    assert weights["transformer.x_embedder.weight"].shape == \
        start.transformer.x_embedder.weight.shape
    assert len(weights) == len(list(start.transformer.parameters())) + len(
        list(start.text_encoder.parameters()))
    moments = torch.load(step2 / "optimizer.pt", weights_only=True)["state"]
    assert sorted(tuple(m[k].shape) for m in moments.values() for k in ("exp_avg", "exp_avg_sq")) \
        == sorted(tuple(t.shape) for t in weights.values() for _ in range(2))
    for part, file in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a, b = (load_file(untar(tmp_path / f"{name}.tar", tmp_path / f"{name}-{part}") / part
                          / f"{file}.safetensors") for name in ("two", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_resume_on_another_number_of_processes_is_refused(photos_zip):
    config = TrainConfig(**FAST, instance_data=str(photos_zip), instance_prompt="a photo of sks "
                         "ball", class_prompt="a photo of a ball", output="o.tar")
    meta = {"config": config.to_dict(), "data_key": "k", "processes": 2}
    check_resumable(meta, config, "k", processes=2)
    with pytest.raises(UserError, match="trained on 2 process.*resume on 2"):
        check_resumable(meta, config, "k", processes=1)


def test_the_predictor_launches_the_processes_and_passes_their_log_on(tmp_path, photos_zip,
                                                                      monkeypatch, capfd):
    import tempfile

    from predict import Predictor
    from test_predict import cog_defaults, uploaded

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # SDXL with its text encoders trained: the first one's last layer gets no gradient, which
    # DDP must be told to expect
    monkeypatch.setenv("BASE_MODEL", "tiny-sdxl")
    monkeypatch.setenv("NUM_PROCESSES", "2")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    predictor = Predictor()
    predictor.setup()
    inputs = dict(cog_defaults(), instance_data=uploaded(photos_zip),
                  instance_prompt="a photo of sks ball", class_prompt="a photo of a ball",
                  resolution=64, num_class_images=2, class_infer_steps=2, max_train_steps=2,
                  learning_rate=1e-4, sample_batch_size=2)
    out = untar(predictor.predict(**inputs), tmp_path / "out")
    record = read_training_json(out)
    assert record["processes"]["count"] == 2 and record["config"]["train_text_encoder"]
    assert (out / "text_encoder_2").is_dir()
    printed = capfd.readouterr().out
    assert "step 2/2" in printed and "x 2 processes" in printed
    # a mistake found by the processes comes back as the same one-line error
    empty = tmp_path / "empty.zip"
    import zipfile

    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("notes.txt", "no photos here")
    with pytest.raises(UserError, match="instance_data: no usable images"):
        predictor.predict(**dict(inputs, instance_data=uploaded(empty)))
