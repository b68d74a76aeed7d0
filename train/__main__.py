"""`python -m train`: the command-line front door (see train/cli.py, or `python -m train -h`)."""

import sys

from .cli import main

sys.exit(main())
