"""cog.yaml is ready for `cog build` on a GPU machine: it parses, and points at what exists.

    .venv/bin/python -m pytest tests/test_cog_yaml.py

No Docker here, so the build itself is not run; this checks what a build reads: the predictor,
the requirements (torch pinned to the version the CUDA version is chosen for), the Python
version of the tested venv, the cog SDK the tests run against, and a .dockerignore that keeps
the local venv out of the build context without hiding what the image needs.
"""

import fnmatch
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
import yaml  # installed with accelerate

from helpers import ROOT

# The CUDA that each pinned torch is built for on PyPI (torch 2.13.0's wheel depends on
# cuda-toolkit 13.0.3): bump both together.
CUDA_FOR_TORCH = {"2.13.0": "13.0"}


@pytest.fixture(scope="module")
def cog():
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


def pins(path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found[name.strip().lower()] = version.strip()
    return found


def test_the_build_is_for_a_gpu_with_the_cuda_of_the_pinned_torch(cog):
    build = cog["build"]
    assert build["gpu"] is True
    requirements = ROOT / build["python_requirements"]
    torch = pins(requirements)["torch"]
    assert torch == pins(ROOT / "constraints.txt")["torch"]
    assert build["cuda"] == CUDA_FOR_TORCH[torch]
    assert build["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    # torchvision breaks diffusers' imports here; xformers is left out (see cog.yaml).
    assert not {"torchvision", "xformers"} & set(pins(requirements))


def test_the_image_gets_the_cog_the_tests_run_against(cog):
    assert cog["build"]["sdk_version"] == pins(ROOT / "requirements-dev.txt")["cog"]
    assert cog["build"]["sdk_version"] == metadata.version("cog")


@pytest.mark.parametrize("config, predictor", [("cog.yaml", "predict.py:Predictor"),
                                               ("generate.yaml", "generate.py:Predictor")])
def test_each_config_builds_the_same_image_for_its_predictor(cog, config, predictor):
    """The trainer (cog.yaml) and the generator (`cog build -f generate.yaml`)."""
    other = yaml.safe_load((ROOT / config).read_text())
    assert other["build"] == cog["build"] and other["predict"] == predictor
    path, name = predictor.split(":")
    module = __import__(path.removesuffix(".py"))
    assert callable(getattr(module, name).predict)


def ignored(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore's patterns keep `path` (or a folder above it) out of the context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p.rsplit("/", 1)[-1], pat.lstrip("*/"))
               for pat in patterns for p in prefixes)


def test_dockerignore_keeps_the_venv_out_and_what_the_image_needs_in(cog):
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD",
                 "example/photos.zip", "train/__pycache__/config.cpython-311.pyc",
                 # the lab and the tests: the image carries only what the trainer runs
                 "toy/model/unet/diffusion_pytorch_model.safetensors", "bench/speed.py",
                 "tests/test_http.py"):
        assert ignored(patterns, path), path
    needed = ["predict.py", "cog.yaml", "generate.py", "generate.yaml",
              cog["build"]["python_requirements"], "weights/model_index.json",
              ".cog/openapi_schema.json", ".cog/generate_schema.json",
              *(str(p.relative_to(ROOT)) for p in (ROOT / "train").glob("*.py"))]
    for path in needed:  # cog refuses to build when .cog is ignored
        assert not ignored(patterns, path), path


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("schema", ["openapi_schema.json", "generate_schema.json"])
def test_the_schemas_are_committed_not_ignored(schema):
    """.cog/ holds what cog build writes, but the schemas are committed for the local server."""
    check = subprocess.run(["git", "check-ignore", "-q", f".cog/{schema}"], cwd=ROOT,
                           timeout=30)
    assert check.returncode == 1  # 1: not ignored
