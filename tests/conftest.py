"""Shared test fixtures: example photos, and an environment for the subprocesses tests start.
Helpers (functions and settings) are in helpers.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import ROOT
from train.example_data import write_example_zip


@pytest.fixture
def photos_zip(tmp_path) -> Path:
    """Four example subject photos, 64 px, in a nested folder of a ZIP."""
    return write_example_zip(tmp_path / "photos.zip", count=4, size=64)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The same photos, made once for a whole module (for module-scoped fixtures that train)."""
    return write_example_zip(tmp_path_factory.mktemp("photos") / "photos.zip", count=4, size=64)


@pytest.fixture
def venv_env():
    """Environment for subprocesses: this interpreter's venv first on PATH, repo importable."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT)
    return env
