"""A quiet terminal: a run prints the project's own lines (dataset summary, progress, results) and
real warnings, not other libraries' notices and progress bars.

    python -m train ... --verbose true     # or DREAMBOOTH_VERBOSE=1: let every library speak

Every entry point that trains or samples (train.run, train.evaluate, the lab's benchmarks) calls
it first thing: it imports no library, so input errors still answer at once. What a library
decides when it is imported (transformers' and diffusers' log levels) is set through the
environment; what it offers only as a function (diffusers' progress bars) needs the library
imported, so the entry point calls it again with loading=True where it is about to load a model.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys


def quiet_libraries(verbose: bool = False, *, loading: bool = False) -> None:
    """Silence other libraries' notices for the rest of the process, unless `verbose` or the
    environment variable DREAMBOOTH_VERBOSE (anything but empty or 0) asks for them. With
    `loading`, import transformers and diffusers (a model is about to load: they are needed
    anyway) to turn their progress bars off too."""
    if verbose or os.environ.get("DREAMBOOTH_VERBOSE", "") not in ("", "0"):
        return
    # bitsandbytes (imported by peft for LoRA, and for 8-bit AdamW) logs through Python's
    # last-resort handler, straight to stderr: "Failed to load CPU gemm_4bit_forward from
    # kernels-community", on every run of a CPU with AVX-512 BF16.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers and diffusers read these when first imported (transformers warns that
    # torchvision is absent as diffusers imports it); child processes (torchrun) inherit them.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Imported now, or already (a Cog worker's second prediction, a test run): tell them directly.
    # transformers first: importing diffusers makes it warn that torchvision is absent.
    for name in ("transformers", "diffusers"):
        if loading:
            importlib.import_module(name)
        if name in sys.modules:
            library = sys.modules[name].utils.logging
            library.set_verbosity_error()
            library.disable_progress_bar()
