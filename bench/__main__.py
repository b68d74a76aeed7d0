"""`python -m bench`: the benchmark harness (bench/speed.py; `python -m bench -h`)."""

import sys

from .speed import main

sys.exit(main())
