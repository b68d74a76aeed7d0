"""User mistakes and how every command-line entry point answers them: one line, no traceback.

    raise UserError("instance_data: the archive is empty; put 3-20 photos of the subject in a ZIP")
    sys.exit(exit_status(lambda: work()))   # `error: ...` on stderr, status 2

The front doors (python -m train, python -m train.evaluate, predict.py) catch UserError; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re
import signal
import sys
import threading

from .distributed import rank_and_size


class UserError(ValueError):
    """A mistake in the user's input. Front doors print its message as one line, no traceback."""


# No space left, a file-size limit (ulimit -f, or a filesystem's largest file), a quota.
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def out_of_disk(error: BaseException) -> bool:
    """Whether `error` is the disk running out: an OSError, or safetensors' own error, which
    carries the OS error's number only in its text ("... (os error 28)")."""
    if isinstance(error, OSError):
        return error.errno in DISK_FULL
    found = re.search(r"\(os error (\d+)\)", str(error))
    return found is not None and int(found.group(1)) in DISK_FULL


def exit_status(work) -> int:
    """Run `work()`; a user mistake is one `error:` line on stderr and status 2, never a
    traceback (the contract of every command-line entry point). SIGTERM (torchrun stopping
    the other processes when one fails, or `kill`) ends it as Ctrl-C does, so the work folder
    is removed on the way out."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    # Every process of a multi-process run meets the same mistake: rank 0 says it.
    say = rank_and_size()[0] == 0
    try:
        work()
    except UserError as e:
        if say:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):  # cleaned up: the next one has
                signal.signal(number, signal.SIG_IGN)       # nothing left to interrupt
        if say:
            print("error: interrupted", file=sys.stderr)
        return 130
    return 0
