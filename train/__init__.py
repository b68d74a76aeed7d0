"""cog-dreambooth's trainer: DreamBooth fine-tuning of Stable Diffusion with diffusers.

    python -m train --instance-data dog.zip --instance-prompt "a photo of sks dog" \
        --class-prompt "a photo of a dog" --model tiny --output dog.tar

or from Python: `train.run(train.TrainConfig(...))`. recipe.py reads top to bottom and names the
module each phase uses; README.md's map says what each module is.

Imports: at the top of each module, but for two deliberate exceptions that tests/test_imports.py
holds. diffusers, transformers, accelerate, peft and bitsandbytes are imported inside the
functions that use them: they take seconds to import, and every check of the user's input
answers before that. And what `python -m train --help` imports (this file, cli, config, errors,
distributed) does not import torch.
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
