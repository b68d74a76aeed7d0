"""Training on several processes (GPUs): who this process is, sharing results, launching N.

One process per GPU, data-parallel (DDP through accelerate): every process holds the whole
model, takes its slice of each global batch, and the gradients are averaged across processes
before each update. Launch with torchrun (or `accelerate launch`, which runs torchrun):

    torchrun --standalone --nproc_per_node 4 -m train --instance-data dog.zip ...
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m train ...   # CPU, gloo

The Cog predictor launches them itself when it sees more than one GPU (`launch`). Rank 0 alone
logs and writes (class images, checkpoints, samples, evaluation, the tarball); the others train
and exit. Ranks are told apart by the RANK and WORLD_SIZE variables torchrun sets.

The command line imports this module before it parses its flags (errors.exit_status asks the
rank), so torch, which takes over a second to import, is imported inside the functions here.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, the number of processes), before any process group exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def share(part: int, count: int, size: int) -> range:
    """The indices of `count` items that process `part` of `size` takes: contiguous, the first
    `count % size` processes one more."""
    base, extra = divmod(count, size)
    start = part * base + min(part, extra)
    return range(start, start + base + (part < extra))


def all_gather(items: list) -> list:
    """Every process's `items`, concatenated in rank order (pickled: PIL images are fine)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def finish() -> None:
    """Leave the process group (torch warns at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_count() -> int:
    """How many processes the Cog predictor trains on: NUM_PROCESSES when set (on a CPU too),
    else one per visible GPU."""
    import torch

    wanted = os.environ.get("NUM_PROCESSES", "").strip()
    return max(1, int(wanted) if wanted else torch.cuda.device_count())


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def command(processes: int, argv: list[str]) -> list[str]:
    """`python -m train ARGV` on `processes` processes of this machine, through torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", "train", *argv]


def launch(processes: int, argv: list[str], *, cpu: bool, log=print) -> tuple[int, list[str]]:
    """Run `python -m train ARGV` on `processes` processes and re-print their output line by
    line through `log` (a Cog prediction's logs see only what this process prints). Returns
    (exit status, the `error:` line of a user mistake, if any: torchrun's report of the failed
    processes that follows it is not passed on). Interrupted (a canceled prediction), it stops them all."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONUNBUFFERED="1")
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    errors = []
    child = subprocess.Popen(command(processes, argv), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in child.stdout:
            line = line.rstrip("\n")
            if errors:  # after a user mistake's one line, only torchrun's failure report
                continue
            if line.startswith("error: "):
                errors.append(line)
            log(line)
        return child.wait(), errors
    finally:
        if child.poll() is None:  # interrupted: torchrun passes SIGTERM on to its workers
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def fingerprint(trainable: dict) -> str:
    """A digest of the trained weights (each tensor's sum in float64, computed where it lives)
    that processes compare."""
    import torch  # here, not at the top: the command line imports this module before torch

    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in trainable.values()]).cpu()
    return hashlib.sha256(sums.numpy().tobytes()).hexdigest()[:16]
