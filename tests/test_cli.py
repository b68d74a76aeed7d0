"""`python -m train` as a user runs it: a real process, a real ZIP, a tarball reloaded and used."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, image_bytes, make_zip, read_training_json, untar


def cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "train", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_cli_trains_and_the_output_reloads_and_generates(tmp_path, photos_zip, venv_env):
    from diffusers import DiffusionPipeline

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(venv_env, TMPDIR=str(scratch))
    out_tar = tmp_path / "out" / "dog.tar"
    result = cli(["--model", "tiny", "--instance-data", str(photos_zip),
                  "--instance-prompt", "a photo of sks ball", "--class-prompt", "a photo of a ball",
                  "--num-class-images", "2", "--class-infer-steps", "2", "--resolution", "64",
                  "--max-train-steps", "6", "--train-text-encoder", "false",
                  "--save-sample-prompt", "a photo of sks ball on the beach", "--n-save-sample",
                  "3", "--save-infer-steps", "3", "--output", str(out_tar)], env, tmp_path)
    assert result.returncode == 0, result.stderr
    # Progress a person can follow: a dataset summary first, then steps with loss and time left.
    log = result.stdout
    assert log.index("dataset: 4 instance images") < log.index("model: loading tiny")
    assert "step 6/6 (100%)  loss " in log and " left 0:00" in log
    leftovers = [p.name for p in scratch.iterdir() if p.name.startswith("dreambooth")]
    assert leftovers == [], "temporary work directory not removed"
    assert sorted(os.listdir(tmp_path / "out")) == ["dog.tar"]

    out = untar(out_tar, tmp_path / "untarred")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "model_index.json", "samples", "scheduler", "text_encoder", "tokenizer",
        "training.json", "unet", "vae"]
    pipe = DiffusionPipeline.from_pretrained(out)  # plain, as a user would: one dtype throughout
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    image = pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    record = read_training_json(out)
    assert record["config"]["max_train_steps"] == 6
    assert record["config"]["train_text_encoder"] is False
    assert record["versions"]["diffusers"] and record["versions"]["torch"]
    assert len(record["history"]) == 6
    assert set(record["timings"]) >= {"intake", "load_model", "class_images", "train", "export"}
    used = record["dataset"]["instance"]["used"]
    assert [u["file"] for u in used] == [f"photos/IMG_{i:04d}.jpg" for i in range(1, 5)]
    assert used[0] == {"file": "photos/IMG_0001.jpg", "caption": "a photo of sks ball",
                       "size": [64, 64], "concept": 0}
    assert len(record["dataset"]["class"]["used"]) == 2
    assert record["samples"] == [f"samples/sample-00{i}.png" for i in range(3)]
    from PIL import Image
    assert Image.open(out / "samples" / "sample-002.png").size == (64, 64)
    # fp16 safetensors by default: small outputs that every loader reads.
    from safetensors import safe_open
    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.float16


@pytest.mark.parametrize("members, message", [
    ({}, "error: instance_data: the archive is empty"),
    ({"readme.txt": b"hi"}, "error: instance_data: no usable images among 1 files"),
    (None, "error: instance_data: photos.zip is not a ZIP or tar archive, nor an image"),
])
def test_bad_archives_fail_fast_with_one_line(tmp_path, venv_env, members, message):
    archive = tmp_path / "photos.zip"
    if members is None:
        archive.write_text("this is not a zip")
    else:
        make_zip(archive, members)
    result = cli(["--model", "tiny", "--instance-data", str(archive), "--instance-prompt",
                  "a photo of sks dog", "--class-prompt", "a photo of a dog",
                  "--output", str(tmp_path / "o.tar")], venv_env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "model: loading" not in result.stdout  # refused before any model loads
    assert not (tmp_path / "o.tar").exists()


@pytest.mark.parametrize("args, message", [
    (["--instance-data", "x.zip", "--output", "o.tar"],
     "error: the following arguments are required: --instance-prompt"),
    (["--instance-data", "x.zip", "--output", "o.tar", "--instance-prompt", "p",
      "--class-prompt", "c", "--learning-rate", "-1"],
     "error: learning_rate must be at least 0.0 (got -1.0)"),
    (["--instance-data", "x.zip", "--output", "o.tar", "--instance-prompt", "p",
      "--with-prior-preservation", "maybe"],
     "error: argument --with-prior-preservation: expected true or false, got 'maybe'"),
    (["--instance-data", "missing.zip", "--output", "o.tar", "--instance-prompt", "p",
      "--class-prompt", "c", "--model", "tiny"],
     "error: instance_data: missing.zip does not exist"),
    (["--instance-data", "missing.zip", "--output", "o.tar", "--instance-prompt", "p",
      "--class-prompt", "c", "--model", "nowhere"], "error: model 'nowhere' not found"),
])
def test_bad_arguments_fail_with_one_line(tmp_path, venv_env, args, message):
    result = cli(args, venv_env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1


def test_missing_8bit_adam_is_said_clearly(tmp_path, photos_zip, venv_env):
    # A bitsandbytes that fails to import stands in for one that is not installed.
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named bitsandbytes')\n")
    env = dict(venv_env, PYTHONPATH=f"{shadow.parent}{os.pathsep}{ROOT}")
    result = cli(["--model", "tiny", "--instance-data", str(photos_zip), "--instance-prompt", "p",
                  "--with-prior-preservation", "false", "--use-8bit-adam", "true",
                  "--output", str(tmp_path / "o.tar")], env, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: use_8bit_adam needs bitsandbytes, which is not "
                                    "installed: pip install bitsandbytes")


def not_files(tmp_path) -> dict:
    """Inputs that are not what they claim: each used to hang a run, or take a minute to be
    told it is not an archive (tarfile reads the whole file to decide)."""
    import gzip

    fifo = tmp_path / "fifo.zip"
    os.mkfifo(fifo)
    zeros = tmp_path / "zeros.zip"
    with open(zeros, "wb") as f:
        f.truncate(512 << 20)  # 512 MiB of zeros, sparse: no disk is used
    bomb = tmp_path / "zeros.tar.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as f:  # 64 MiB of zeros in 64 KiB
        for _ in range(64):
            f.write(bytes(1 << 20))
    return {"fifo": str(fifo), "device": "/dev/zero", "zeros": str(zeros), "bomb": str(bomb)}


@pytest.mark.parametrize("option, case, message", [
    ("--instance-data", "fifo", "error: instance_data: {} is not a file or a folder (it is a "
                                "FIFO, a device or a socket): give a ZIP or tar archive"),
    ("--instance-data", "device", "error: instance_data: {} is not a file or a folder"),
    ("--instance-data", "zeros", "error: instance_data: zeros.zip is not a ZIP or tar archive"),
    ("--instance-data", "bomb", "error: instance_data: zeros.tar.gz is not a ZIP or tar archive"),
    ("--resume", "fifo", "error: resume: {} is not a file or a folder (it is a FIFO, a device or "
                         "a socket): give a checkpoint folder or a tarball of one"),
    ("--resume", "zeros", "error: resume: {} is neither a checkpoint folder nor a tarball"),
    ("--base-checkpoint", "fifo", "error: base_checkpoint: {} is not a file or a folder (it is a "
                                  "FIFO, a device or a socket): give a diffusers folder"),
])
def test_inputs_that_are_not_files_fail_at_once_with_one_line(tmp_path, photos_zip, venv_env,
                                                              option, case, message):
    import time

    named = not_files(tmp_path)[case]
    args = ["--model", "tiny", "--instance-data", str(photos_zip), "--instance-prompt",
            "a photo of sks ball", "--with-prior-preservation", "false",
            "--output", str(tmp_path / "out.tar"), option, named]
    started = time.monotonic()
    result = cli(args, venv_env, tmp_path)
    assert time.monotonic() - started < 30  # the process starts in ~2 s; it used to hang
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(message.format(named)), result.stderr
    assert not (tmp_path / "out.tar").exists()


def file_size_limit(limit: int):
    """For a subprocess: files of at most `limit` bytes (ulimit -f), a write past it failing with
    EFBIG rather than SIGXFSZ killing the process: a full disk, as a test can make one."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("where", ["export", "tarball"])
def test_a_full_disk_fails_in_one_line_and_leaves_no_partial_file(tmp_path, photos_zip,
                                                                   venv_env, where):
    """The disk fills while the weights are written into the work folder, or while the tarball
    is: one line, no tarball and no .partial beside it, an empty work_dir."""
    import tarfile

    args = ["--model", "tiny", "--instance-data", str(photos_zip), "--instance-prompt",
            "a photo of sks ball", "--with-prior-preservation", "false", "--resolution", "64",
            "--max-train-steps", "1", "--work-dir", str(tmp_path / "work")]
    limit = 1 << 20  # below the UNet's weights: the export into the work folder fails
    if where == "tarball":  # room for every file, not for the tarball that holds them all
        whole = tmp_path / "whole.tar"
        assert cli([*args, "--output", str(whole)], venv_env, tmp_path).returncode == 0
        with tarfile.open(whole) as tar:
            largest = max(m.size for m in tar.getmembers())
        limit = (largest + whole.stat().st_size) // 2
    out = tmp_path / "out" / "model.tar"
    out.parent.mkdir()
    result = subprocess.run([sys.executable, "-m", "train", *args, "--output", str(out)],
                            env=venv_env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, preexec_fn=file_size_limit(limit))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ran out of disk space (")
    assert "no tarball was written: free some space" in result.stderr
    assert list(out.parent.iterdir()) == []  # no model.tar, no model.tar.partial
    assert list((tmp_path / "work").iterdir()) == []


def test_unknown_model_is_explained(tmp_path, photos_zip, venv_env):
    result = cli(["--model", str(tmp_path / "weights"), "--instance-data", str(photos_zip),
                  "--instance-prompt", "p", "--with-prior-preservation", "false",
                  "--output", str(tmp_path / "o.tar")], venv_env, tmp_path)
    assert result.returncode == 2
    assert "run script/download-weights" in result.stderr and result.stderr.count("\n") == 1
    assert "dataset:" not in result.stdout  # refused before intake reports


def test_a_run_prints_its_own_lines_and_no_other_librarys(tmp_path, photos_zip, venv_env):
    """A quiet terminal: a folder model (diffusers' loading bars and deprecations), LoRA and
    8-bit AdamW (peft and bitsandbytes, which logs straight to stderr) and samples, and not one
    foreign line on stderr; --verbose true lets the libraries speak again."""
    args = ["--model", "toy", "--instance-data", str(photos_zip),
            "--instance-prompt", "a photo of sks ball", "--with-prior-preservation", "false",
            "--resolution", "64", "--max-train-steps", "2", "--use-lora", "true",
            "--use-8bit-adam", "true", "--save-sample-prompt", "a photo of sks ball",
            "--n-save-sample", "1", "--save-infer-steps", "2",
            "--output", str(tmp_path / "out.tar")]
    result = cli(args, venv_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "step 2/2 (100%)" in result.stdout and "done: wrote" in result.stdout
    loud = cli(args + ["--verbose", "true"], venv_env, tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert "Loading pipeline components" in loud.stderr  # diffusers' own progress bar


def test_cli_image_bytes_fixture_is_a_real_jpeg():
    assert image_bytes()[:3] == b"\xff\xd8\xff"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu(tmp_path, photos_zip, venv_env, precision):
    from diffusers import DiffusionPipeline

    result = cli(["--model", "tiny", "--instance-data", str(photos_zip), "--instance-prompt",
                  "a photo of sks ball", "--class-prompt", "a photo of a ball",
                  "--num-class-images", "2", "--class-infer-steps", "2", "--resolution", "64",
                  "--max-train-steps", "5", "--mixed-precision", precision,
                  "--gradient-checkpointing", "true", "--output", str(tmp_path / "o.tar")],
                 venv_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"on cuda ({precision} mixed precision)" in result.stdout
    out = untar(tmp_path / "o.tar", tmp_path / "o")
    assert read_training_json(out)["mixed_precision"] == precision
    pipe = DiffusionPipeline.from_pretrained(out, torch_dtype=torch.float16).to("cuda")
    assert pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64).images
