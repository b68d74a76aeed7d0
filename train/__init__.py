"""cog-dreambooth's trainer: DreamBooth fine-tuning of Stable Diffusion with diffusers.

    python -m train --instance-data dog.zip --instance-prompt "a photo of sks dog" \
        --class-prompt "a photo of a dog" --model tiny --output dog.tar

or from Python: `train.run(train.TrainConfig(...))`. Modules, in the order a run uses them:
config (settings), intake (archives to images), models (base models), sampling (class images and
samples), data (cached latents and prompts), loop (the training loop), export (the tarball),
recipe (all of it, top to bottom), cli (the command line).
"""

from .config import TrainConfig
from .errors import UserError

__all__ = ["TrainConfig", "UserError", "run"]


def __getattr__(name):
    # `run` imports torch (over a second): loaded on first use, so `python -m train --help`
    # and argument errors answer at once.
    if name == "run":
        from .recipe import run

        return run
    raise AttributeError(f"module 'train' has no attribute {name!r}")
