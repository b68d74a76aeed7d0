"""Fault injection: a run interrupted in each of its phases leaves nothing behind.

    .venv/bin/python -m pytest tests/test_faults.py

A real SIGINT is delivered to the process (os.kill on itself, as Ctrl-C or `kill -INT` does) from
inside each phase of the recipe: intake, class images, training, a checkpoint half written, the
export, the tarball half written. Once, and twice: the second one arrives while the work folder
is being removed, as when a user presses Ctrl-C again or a client cancels twice. Each time the run
must end with KeyboardInterrupt (the front doors turn it into one line: test_cli, test_http) and
leave an empty work_dir, no tarball or .partial beside the output, and only whole checkpoints.
SIGTERM and a cancel over HTTP end up in the same clean-up: tests/test_cli.py, tests/test_http.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile

import pytest
import torch

import train.recipe as recipe
from helpers import FAST
from train import TrainConfig, run


def interrupt() -> None:
    """Deliver SIGINT to this thread, as Ctrl-C would: Python raises KeyboardInterrupt in the
    main thread at its next instruction, which is in the phase that called this. (raise(3), not
    kill(2): a signal sent to the process may be taken by any of its threads that does not
    block it, and handled only later.)"""
    signal.raise_signal(signal.SIGINT)


@pytest.fixture(autouse=True)
def ctrl_c_raises_keyboard_interrupt():
    """SIGINT as a command line sees it, whatever earlier tests in this process installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_on_call(monkeypatch, owner, name: str, call: int = 1) -> None:
    """Make the `call`-th call of owner.name deliver SIGINT as it starts."""
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            interrupt()
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, interrupted)


# Where each phase is interrupted: (object, function, which call).
PHASES = {
    "intake": (recipe, "take_in", 1),
    "class images": (recipe, "top_up_class_images", 1),
    "training": (recipe, "train", 2),               # the loop's second stretch, after a checkpoint
    "checkpoint": (torch, "save", 1),               # checkpoint.save: weights written, state not
    "export": (recipe, "export_formats", 1),
    "tarball": (tarfile.TarFile, "addfile", 3),     # the tarball half written
}


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
@pytest.mark.parametrize("phase", PHASES)
def test_an_interrupted_run_leaves_nothing_behind(tmp_path, photos_zip, monkeypatch, phase,
                                                  twice):
    work, out, checkpoints = tmp_path / "work", tmp_path / "out", tmp_path / "checkpoints"
    out.mkdir()
    work.mkdir()
    config = TrainConfig(**dict(FAST, instance_data=str(photos_zip),
                                instance_prompt="a photo of sks ball",
                                class_prompt="a photo of a ball", output=str(out / "model.tar"),
                                work_dir=str(work), checkpointing_steps=2,
                                checkpoint_dir=str(checkpoints)))
    interrupt_on_call(monkeypatch, *PHASES[phase])
    if twice:  # the second Ctrl-C lands while the work folder is being removed
        removing = []
        rmtree = shutil.rmtree

        def interrupted_rmtree(path, *args, **kwargs):
            if os.path.basename(path).startswith("dreambooth-") and not removing:
                removing.append(path)
                interrupt()
            return rmtree(path, *args, **kwargs)
        monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        run(config, log=lines.append)
    monkeypatch.undo()
    if twice and phase != "intake":  # intake is before the work folder exists
        assert removing, "the second interrupt was never delivered"
    assert list(work.iterdir()) == [], "work folder left behind"
    assert list(out.iterdir()) == [], "a tarball or .partial left behind"
    left = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.exists() else []
    expected = {"training": ["step-000002"], "export": ["step-000002", "step-000004"],
                "tarball": ["step-000002", "step-000004"]}.get(phase, [])
    assert left == expected, lines  # whole checkpoints only: no step-*.partial
    for name in left:
        assert (checkpoints / name / "state.json").is_file()


def test_sigterm_twice_on_the_command_line_is_one_line_and_leaves_nothing(tmp_path, photos_zip,
                                                                          venv_env):
    """`kill` (or docker stop, or torchrun stopping a failed run) twice while training: exit
    status 130, `error: interrupted` and nothing else on stderr, nothing left on disk."""
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--model", "tiny", "--instance-data", str(photos_zip), "--instance-prompt",
            "a photo of sks ball", "--with-prior-preservation", "false", "--resolution", "64",
            "--max-train-steps", "100000", "--log-every", "1", "--work-dir", str(work),
            "--output", str(out / "model.tar")]
    child = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=tmp_path,
                             env=dict(venv_env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in child.stdout:  # ends if the process dies early
            seen.append(line)
            if line.startswith("step 2/"):
                break
        assert list(work.iterdir()), "".join(seen)  # the work folder is there, training
        child.send_signal(signal.SIGTERM)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130 and stderr == "error: interrupted\n", stderr
    assert list(work.iterdir()) == [] and not out.exists()


def test_a_server_removes_the_work_folders_its_own_runs_left(tmp_path):
    """What an interruption landing just before a run's own clean-up leaves (remove_own_runs,
    after every prediction): this process's work folders go, nothing else does."""
    from train.cleanup import remove_own_runs

    mine = tmp_path / f"dreambooth-{os.getpid()}-abc123"
    (mine / "class_images").mkdir(parents=True)
    (mine / "class_images" / "0.png").write_bytes(b"x")
    others = [tmp_path / f"dreambooth-{os.getpid() + 1}-abc123",  # another process's run
              tmp_path / f"dreambooth-out-{os.getpid()}-abc123",  # the server's own output
              tmp_path / f"dreambooth-gen-{os.getpid()}-abc123"]  # a generator's cache
    for folder in others:
        folder.mkdir()
    remove_own_runs(tmp_path)
    assert not mine.exists() and all(folder.is_dir() for folder in others)
