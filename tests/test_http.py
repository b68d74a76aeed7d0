"""The real Cog HTTP server (coglet) in a subprocess, serving predict.py on the tiny model.

This is how Replicate and other services call the trainer: POST /predictions with JSON inputs,
files as data: URIs or URLs, the output tarball returned base64-inlined without an upload URL.
"""

import base64
import io
import json
import socket
import subprocess
import tarfile
import time
import urllib.request
import zipfile

import pytest

from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, payload=None, timeout=300):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import os
    import sys

    scratch = tmp_path_factory.mktemp("server-tmp")
    port = free_port()
    env = dict(os.environ, BASE_MODEL="tiny", COG_PREDICT_TYPE_STUB="predict.py:Predictor",
               PORT=str(port), TMPDIR=str(scratch), PYTHONPATH=str(ROOT),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    log = open(scratch.parent / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # bounded: at most a minute to start
            try:
                if call(base + "/health-check", timeout=2)["status"] == "READY":
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("Cog server did not become READY; see " + log.name)
        yield base, scratch
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def data_uri(path) -> str:
    return "data:application/zip;base64," + base64.b64encode(path.read_bytes()).decode()


def test_training_over_http(server, photos_zip, tmp_path):
    from diffusers import DiffusionPipeline

    base, _ = server
    result = call(base + "/predictions", {"input": {
        "instance_data": data_uri(photos_zip), "instance_prompt": "a photo of sks ball",
        "class_prompt": "a photo of a ball", "resolution": 64, "num_class_images": 2,
        "class_infer_steps": 2, "max_train_steps": 3}})
    assert result["status"] == "succeeded", result.get("error")
    # The progress lines reach the prediction's logs.
    assert "dataset: 4 instance images" in result["logs"]
    assert "step 3/3 (100%)" in result["logs"]
    header, payload = result["output"].split(",", 1)
    assert header == "data:application/x-tar;base64"
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(payload))) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["config"]["max_train_steps"] == 3 and len(record["history"]) == 3
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64).images


def test_user_error_over_http_is_one_line(server, tmp_path):
    base, scratch = server
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    result = call(base + "/predictions", {"input": {
        "instance_data": data_uri(empty), "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of a dog"}})
    assert result["status"] == "failed"
    assert result["error"].endswith("instance_data: the archive is empty; put 3-20 photos of "
                                    "the subject in a ZIP")
    assert "Traceback" not in result["logs"]
    assert not [p for p in scratch.iterdir() if p.name.startswith("dreambooth-")
                and not p.name.startswith("dreambooth-out")], "work directory left behind"
