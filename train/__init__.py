"""cog-dreambooth's trainer: DreamBooth fine-tuning of Stable Diffusion with diffusers.

    python -m train --instance-data dog.zip --instance-prompt "a photo of sks dog" \
        --class-prompt "a photo of a dog" --model tiny --output dog.tar

or from Python: `train.run(train.TrainConfig(...))`. Modules, in the order a run uses them:
config (settings), intake (archives to images), models (base models), sampling (class images and
samples), data (cached latents and prompts), loop (the training loop), export (the tarball),
recipe (all of it, top to bottom), cli (the command line).
"""

from .config import TrainConfig, UserError
from .recipe import run

__all__ = ["TrainConfig", "UserError", "run"]
