"""Removing what a run made, whatever interrupts it: the work folder, a partial tarball, and what
processes killed outright left behind.

    remove(work)                      # finishes even if a second Ctrl-C or cancel arrives
    remove_leftovers("/tmp")          # -> names of dreambooth-PID-* folders of dead processes
    remove_own_runs("/tmp")           # what this process's interrupted runs left (a server's)

A run removes its work folder on the way out, and the way out is usually an interruption: Ctrl-C,
SIGTERM, a Cog cancel. A user who presses Ctrl-C twice, or a client that cancels twice, would
interrupt that clean-up and leak gigabytes; `remove` finishes first and passes the interruption
on afterwards. Only SIGKILL (or a lost machine) gives a process no chance at all: what it left is
named with its process id, and the next run or server removes it once that process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

# Work folders (dreambooth-PID-*), a server's output folders (dreambooth-out-PID-*), its
# downloads (dreambooth-in-PID-*) and a generator's cache (dreambooth-gen-PID-*), where PID is
# the process that made them.
LEFTOVER = re.compile(r"dreambooth-(?:out-|in-|gen-)?(\d+)-\w+")


def remove(path: str | Path) -> None:
    """Remove a file or folder tree, if it exists. An interruption that arrives meanwhile (a
    second Ctrl-C, SIGTERM or cancel: any BaseException) is held until the removal is done,
    then raised."""
    path = Path(path)
    held = None
    while True:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            break
        except OSError:
            break  # not ours to remove (permissions): as rmtree's ignore_errors
        except BaseException as e:  # noqa: BLE001 - an interruption: finish, then raise it
            held = held or e
    if held is not None:
        raise held


def remove_own_runs(folder: str | Path) -> None:
    """Remove the work folders (dreambooth-PID-*) this process's runs left in `folder`. A run
    removes its own on the way out, but an interruption can land in the few statements before
    that removal starts (a second cancel, milliseconds after the first); a server calls this
    after every prediction, so that it takes a third to leak one."""
    for path in Path(folder).glob(f"dreambooth-{os.getpid()}-*"):
        remove(path)


def remove_leftovers(folder: str | Path) -> list[str]:
    """Remove the folders named LEFTOVER in `folder` whose process is no longer running; returns
    the names removed. An SD 1.5 output folder holds a 2 GB tarball."""
    removed = []
    for path in Path(folder).glob("dreambooth-*"):
        match = LEFTOVER.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not _alive(int(match[1])):
            remove(path)
            removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True
