"""The real Cog HTTP server (coglet) in a subprocess on loopback, serving predict.py on `tiny`.

    .venv/bin/python -m pytest tests/test_http.py --durations=10

This is how Replicate and other services call the trainer: POST /predictions with JSON inputs,
files as data: URIs or URLs, long trainings sent with `Prefer: respond-async` and a webhook, and
the output tarball inlined as a data: URI, or PUT to the server's `--upload-url`. Nothing here is
mocked: a real server validates inputs with the committed .cog/openapi_schema.json, a loopback
HTTP server serves inputs, receives webhooks and takes uploads. Every request and every wait has
a time limit, so a hung server fails a test instead of hanging the suite.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, read_training_json, untar
from serving import (TIMEOUT, Loopback, Server, call, data_uri, inlined, one_thread,
                     untar_bytes, wait_for)

SCHEMA = ROOT / ".cog" / "openapi_schema.json"
SERVE = [str(ROOT / "script" / "serve"), "predict"]  # as docs/http.md says to run it
PROMPTS = dict(instance_prompt="a photo of sks ball", class_prompt="a photo of a ball")
# A few seconds of training once the worker is warm: one class image, 64 px, two steps.
TINY = dict(PROMPTS, resolution=64, num_class_images=1, class_infer_steps=1, sample_batch_size=1,
            max_train_steps=2, log_every=1, learning_rate=1e-4)
# The least a prediction can do and still train and export: no class images, one step.
MINIMAL = dict(instance_prompt="a photo of sks ball", resolution=64, max_train_steps=1,
               with_prior_preservation=False)


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    server = Loopback(tmp_path_factory.mktemp("loopback"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, photos):
    """One server for the module, warmed up: a worker's first training pays one-off costs
    (imports, first CPU kernels) that the tests' timings should not show."""
    scratch = tmp_path_factory.mktemp("server-tmp")
    # Small bounds on downloads, so that the tests of them take seconds.
    server = Server(scratch, scratch.parent / "server.log", command=SERVE,
                    env=dict(DOWNLOAD_TIMEOUT="5", MAX_DOWNLOAD_MIB="8"))
    try:
        status, result = server.predict(dict(TINY, instance_data=data_uri(photos)))
        assert status == 200 and result["status"] == "succeeded", result
        yield server
    finally:
        server.stop()


def test_the_server_serves_the_committed_schema(server):
    """The local server validates with .cog/openapi_schema.json (what script/schema writes)."""
    status, schema = call("GET", server.base + "/openapi.json")
    assert status == 200 and schema == json.loads(SCHEMA.read_text())


@pytest.mark.parametrize("change, field, message", [
    (dict(resolution="512"), "resolution", '"512" is not of type "integer"'),
    (dict(resolution=4096), "resolution", "4096 is greater than the maximum of 2048"),
    (dict(instance_data=None), "instance_data", "Field required"),
    (dict(lr_scheduler="exponential"), "lr_scheduler", '"exponential" is not one of'),
])
def test_invalid_inputs_are_refused_with_422(server, photos, change, field, message):
    inputs = {k: v for k, v in {**TINY, "instance_data": data_uri(photos), **change}.items()
              if v is not None}  # None: leave the input out
    started = time.monotonic()
    status, body = server.predict(inputs)
    assert status == 422, body
    assert time.monotonic() - started < 5, "refused only after work started"
    [error] = body["detail"]
    assert error["loc"] == ["body", "input", field] and message in error["msg"], error


def test_training_from_a_data_uri_returns_a_tarball_that_reloads(server, photos, tmp_path):
    from diffusers import DiffusionPipeline

    status, result = server.predict(dict(TINY, instance_data=data_uri(photos)))
    assert status == 200 and result["status"] == "succeeded", result.get("error")
    # The progress lines reach the prediction's logs.
    assert "dataset: 4 instance images" in result["logs"]
    assert "step 1/2" in result["logs"] and "step 2/2 (100%)" in result["logs"]
    out = untar_bytes(inlined(result["output"]), tmp_path / "out")
    record = read_training_json(out)
    assert record["config"]["max_train_steps"] == 2 and len(record["history"]) == 2
    pipe = DiffusionPipeline.from_pretrained(out)
    with one_thread():
        assert pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64).images


def test_a_flux_base_model_trains_a_lora_over_http_that_reloads(photos, tmp_path):
    """BASE_MODEL names the family: the same server trains FLUX.1 (its tiny built-in)."""
    from diffusers import FluxPipeline

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    server = Server(scratch, tmp_path / "server.log", command=SERVE,
                    env=dict(BASE_MODEL="tiny-flux"))
    try:
        status, result = server.predict(dict(TINY, instance_data=data_uri(photos),
                                             use_lora=True))
    finally:
        server.stop()
    assert status == 200 and result["status"] == "succeeded", result.get("error")
    out = untar_bytes(inlined(result["output"]), tmp_path / "out")
    record = read_training_json(out)
    assert record["family"] == "flux" and record["config"]["model"] == "tiny-flux"
    from train.models import build_builtin

    pipe = build_builtin("tiny-flux")
    assert isinstance(pipe, FluxPipeline)
    pipe.load_lora_weights(str(out / "lora"))
    with one_thread():
        assert pipe("a photo of sks ball", num_inference_steps=2, height=64, width=64).images


def test_training_from_a_url(server, photos, loopback, tmp_path):
    (loopback.folder / "dog.zip").write_bytes(photos.read_bytes())
    # 64.0: JSON has one number type, and a client may send a whole number with a point.
    status, result = server.predict(dict(TINY, instance_data=loopback.url + "/files/dog.zip",
                                         resolution=64.0))
    assert status == 200 and result["status"] == "succeeded", result.get("error")
    record = read_training_json(untar_bytes(inlined(result["output"]), tmp_path / "out"))
    assert record["config"]["resolution"] == 64
    assert len(record["dataset"]["instance"]["used"]) == 4


@pytest.mark.parametrize("sender, message", [
    ("trickle", "the download from 127.0.0.1 took longer than the 5 s allowed (0 MiB arrived)"),
    ("stall", "the download from 127.0.0.1 stalled: nothing arrived for 5 s"),
    ("huge", "the file at 127.0.0.1 is 2048 MiB, over the 8 MiB a download may be"),
    ("endless", "the download from 127.0.0.1 passed the 8 MiB a download may be"),
    ("broken", "the download from 127.0.0.1 broke off after 1000 of 1000000 bytes"),
    ("to_ftp", "redirected to ftp:, not http(s)"),
    ("missing", "127.0.0.1 answered 404 Not Found"),
])
def test_a_hostile_download_fails_in_one_line_within_its_bounds(server, loopback, sender,
                                                                 message):
    """The server (its environment: DOWNLOAD_TIMEOUT 5 s, MAX_DOWNLOAD_MIB 8) downloads a URL
    itself, within those bounds: one line naming the input and what went wrong, no partial file,
    and the server ready for the next prediction."""
    started = time.monotonic()
    status, result = server.predict(dict(MINIMAL, instance_data=f"{loopback.url}/{sender}/x.zip"),
                                    timeout=60)
    assert status == 200 and result["status"] == "failed", result
    assert result["error"].endswith(f"instance_data: {message}"), result["error"]
    assert "\n" not in result["error"] and "Traceback" not in result["logs"]
    assert time.monotonic() - started < 15
    assert server.inputs() == [] and server.work_folders() == []
    wait_for(server.ready, 10, "the server to be READY again")


def hostile_files(photos: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """One hostile file for each file input: (the file, what the one-line error says)."""
    escaping = folder / "escaping.tar"
    with tarfile.open(escaping, "w") as tar:
        info = tarfile.TarInfo("../../outside.jpg")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\xff\xd8\xff\xe0"))
    junk = folder / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    return {"instance_data": (escaping, "outside"),
            "class_data": (junk, "not a ZIP or tar archive"),
            "resume": (junk, "resume: "),
            "base_checkpoint": (junk, "base_checkpoint: file.zip is neither a diffusers folder "
                                      "nor a .safetensors checkpoint")}


@pytest.mark.parametrize("field", ["instance_data", "class_data", "resume", "base_checkpoint"])
def test_a_hostile_file_fails_in_one_line_and_leaves_nothing(server, photos, tmp_path, field):
    """Each file input, sent a hostile file over HTTP: one line naming the input, no traceback,
    no input or work folder left in the server's temp folder, and the server ready."""
    hostile, says = hostile_files(photos, tmp_path)[field]
    inputs = dict(MINIMAL, instance_data=data_uri(photos)) | {field: data_uri(hostile)}
    if field == "class_data":  # read only with prior preservation
        inputs |= dict(with_prior_preservation=True, class_prompt="a photo of a ball",
                       num_class_images=1)
    status, result = server.predict(inputs, timeout=60)
    assert status == 200 and result["status"] == "failed", result
    error = result["error"]
    assert f"{field}: " in error and says in error and "\n" not in error, error
    assert "Traceback" not in result["logs"]
    assert server.inputs() == [] and server.work_folders() == []
    wait_for(server.ready, 10, "the server to be READY again")


def test_a_cancel_stops_a_download_at_once(server, loopback):
    """Cog's own download ignores a cancel (the server stays BUSY until the sender stops, and
    no final webhook comes); predict.py's stops within a second and removes the partial file."""
    url = f"/trickle/{time.monotonic()}.zip"
    running = server.start(dict(MINIMAL, instance_data=loopback.url + url),
                           webhook=loopback.url + "/hook")
    wait_for(lambda: url in loopback.requests, 30, "the download to start")
    canceled = time.monotonic()
    status, _ = call("POST", f"{server.base}/predictions/{running}/cancel", timeout=10)
    assert status == 200, loopback.webhooks(running)
    final = loopback.final(running, 10)
    assert final["status"] == "canceled" and "instance_data: downloading" in final["logs"]
    assert time.monotonic() - canceled < 3
    wait_for(server.ready, 10, "the server to be READY again")
    assert server.inputs() == []


def test_async_training_reports_by_webhook(server, photos, loopback, tmp_path):
    prediction = server.start(dict(TINY, instance_data=data_uri(photos), max_train_steps=8),
                              webhook=loopback.url + "/hook")
    final = loopback.final(prediction)
    assert final["status"] == "succeeded", final.get("error")
    events = loopback.webhooks(prediction)
    # start: the first webhook comes before any log line.
    assert events[0]["status"] == "processing" and not events[0].get("logs")
    # logs: sent while it trains, each a longer prefix of the final logs (progress, in order).
    during = [e["logs"] for e in events if e["status"] == "processing" and e.get("logs")]
    assert any("step 1/8" in logs and "step 8/8" not in logs for logs in during), during
    assert all(final["logs"].startswith(logs) for logs in during)
    assert [f"step {k}/8" in final["logs"] for k in range(1, 9)] == [True] * 8
    # completed: the last webhook carries the output.
    assert events[-1] == final
    record = read_training_json(untar_bytes(inlined(final["output"]), tmp_path / "out"))
    assert len(record["history"]) == 8


def test_a_user_error_fails_in_one_line(server, tmp_path):
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    status, result = server.predict(dict(PROMPTS, instance_data=data_uri(empty)))
    assert status == 200 and result["status"] == "failed"
    message = "instance_data: the archive is empty; put 3-20 photos of the subject in a ZIP"
    assert result["error"].endswith(message) and "\n" not in result["error"], result["error"]
    assert "Traceback" not in result["logs"]
    assert server.work_folders() == []


def server_paths(photos: Path, scratch: Path) -> dict[str, str]:
    """Things a client might name instead of sending a file: each exists on the server (but
    one), and the server must not read, open or describe any of them."""
    fifo = scratch / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)  # opened to read, it blocks: the prediction would hang
    link = scratch / "tmpupload.zip"  # in the server's TMPDIR, named as Cog names its downloads
    if not link.is_symlink():
        link.symlink_to(photos)
    return {"existing file": str(photos), "existing folder": str(photos.parent),
            "missing path": str(photos.parent / "missing.zip"), "fifo": str(fifo),
            "device": "/dev/zero", "symlink": str(link), "file URL": photos.as_uri(),
            "relative path": "photos.zip"}


@pytest.mark.parametrize("field, case", [
    *[("instance_data", case) for case in ("existing file", "existing folder", "missing path",
                                           "fifo", "device", "symlink", "file URL",
                                           "relative path")],
    ("class_data", "existing file"), ("resume", "existing folder"),
    ("base_checkpoint", "existing file")])
def test_a_path_on_the_server_is_refused_unread_and_the_server_stays_healthy(
        server, photos, field, case):
    named = server_paths(photos, server.scratch)[case]
    inputs = dict(MINIMAL, instance_data=data_uri(photos))
    started = time.monotonic()
    status, result = server.predict({**inputs, field: named}, timeout=30)
    assert status == 200 and result["status"] == "failed", result
    assert time.monotonic() - started < 10
    # The same line whatever the path names (a file, nothing, a FIFO): it tells nothing of it.
    message = (f"{field}: send the file itself, as an http(s) URL or a data: URI; the server "
               "does not read files by their path on the server")
    assert result["error"].endswith(message) and "\n" not in result["error"], result["error"]
    assert "Traceback" not in result["logs"] and server.work_folders() == []
    # Healthy: ready, and the next prediction, with the file sent as data, trains.
    wait_for(server.ready, 10, "the server to be READY again")  # BUSY while it tidies up
    status, result = server.predict(inputs)
    assert status == 200 and result["status"] == "succeeded", result.get("error")


def test_a_second_prediction_while_one_trains_is_refused_with_409(server, photos, loopback):
    busy = server.start(dict(TINY, instance_data=data_uri(photos), max_train_steps=100000),
                        webhook=loopback.url + "/hook")
    try:
        status, body = server.predict(dict(TINY, instance_data=data_uri(photos)), timeout=10)
        assert status == 409, body
    finally:
        call("POST", f"{server.base}/predictions/{busy}/cancel", timeout=10)
        assert loopback.final(busy, 60)["status"] == "canceled"


def test_cancel_twice_mid_training_cleans_up_and_the_next_prediction_runs(server, photos, loopback):
    running = server.start(dict(TINY, instance_data=data_uri(photos), max_train_steps=100000),
                           webhook=loopback.url + "/hook")

    def training() -> bool:
        return any("step 2/100000" in (e.get("logs") or "") for e in loopback.webhooks(running))

    try:
        wait_for(training, 120, "training to pass step 2")
        assert server.work_folders(), "the run's work folder should exist while it trains"
    finally:
        status, _ = call("POST", f"{server.base}/predictions/{running}/cancel", timeout=10)
        # A client that cancels twice: the second lands while the work folder is removed.
        again, _ = call("POST", f"{server.base}/predictions/{running}/cancel", timeout=10)
    assert status == 200 and again in (200, 404)  # 404: the prediction had already ended
    final = loopback.final(running, 60)
    assert final["status"] == "canceled" and not final.get("output")
    wait_for(lambda: server.work_folders() == [], 10, "the work folder to be removed")
    status, result = server.predict(dict(TINY, instance_data=data_uri(photos)))
    assert status == 200 and result["status"] == "succeeded", result.get("error")


def test_the_example_client_trains_and_fetches_the_weights(server, photos, tmp_path):
    """examples/client.py, as docs/http.md shows it: async request, webhooks, weights saved."""
    out = tmp_path / "dog.tar"
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "client.py"), "--server", server.base,
         "--photos", str(photos), "--instance-prompt", "a photo of sks ball",
         "--class-prompt", "a photo of a ball", "--out", str(out), "--timeout", "120",
         "-i", "resolution=64", "-i", "num_class_images=1", "-i", "class_infer_steps=1",
         "-i", "max_train_steps=2", "-i", "log_every=1"],
        capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert "step 2/2 (100%)" in run.stderr  # the logs, printed as the webhooks brought them
    assert read_training_json(untar(out, tmp_path / "out"))["config"]["resolution"] == 64


def test_the_example_client_refuses_a_misspelled_input_the_server_would_drop(server, photos,
                                                                             tmp_path):
    """Cog's server drops an input name it does not know and trains with the default; the
    client compares the names with the server's schema first, and sends nothing."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "client.py"), "--server", server.base,
         "--photos", str(photos), "--instance-prompt", "a photo of sks ball",
         "--out", str(tmp_path / "dog.tar"), "-i", "max_train_step=2"],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == ("error: max_train_step is not an input of this server; did you mean "
                          "max_train_steps?\n")
    wait_for(server.ready, 10, "the server to be READY")  # nothing was sent


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_ten_predictions_in_a_row_leave_no_files_and_no_memory_behind(server, photos):
    inputs = dict(MINIMAL, instance_data=data_uri(photos))
    assert server.predict(inputs)[1]["status"] == "succeeded"
    files, rss = files_under(server.scratch), server.rss_mib()
    for _ in range(10):
        status, result = server.predict(inputs)
        assert status == 200 and result["status"] == "succeeded", result.get("error")
    # On disk: the one latest tarball, nothing more (inputs, work folders, partial files).
    after = files_under(server.scratch)
    assert after.keys() == files.keys(), set(after) ^ set(files)
    assert sum(after.values()) <= sum(files.values()) * 1.01
    # In memory: the server and its worker (~650 MiB here) back to where they were. Each
    # response held the inlined tarball (~6 MB, ~50 MB at its peak): ten leaks would show.
    assert server.rss_mib() < rss + 128, (rss, server.rss_mib())


def test_a_server_starting_removes_what_a_killed_one_left(tmp_path):
    """A server killed outright (SIGKILL) leaves its output folder (with a tarball: 2 GB for
    SD 1.5), a run's work folder and its downloaded inputs in the temp folder; the next one to
    start removes them, and nothing of a process still alive."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    scratch = tmp_path / "server-tmp"
    left = [scratch / f"dreambooth-out-{dead.pid}-abc123", scratch / f"dreambooth-{dead.pid}-x_9",
            scratch / f"dreambooth-in-{dead.pid}-files"]
    alive = scratch / f"dreambooth-{os.getpid()}-mine"
    for folder in (*left, alive):
        folder.mkdir(parents=True)
        (folder / "dreambooth-weights.tar").write_bytes(b"\0" * 1024)
    server = Server(scratch, tmp_path / "server.log")
    server.stop()
    assert not any(folder.exists() for folder in left)
    assert (alive / "dreambooth-weights.tar").is_file()
    assert f"removed {left[0].name}, left by a server that was stopped" in (
        tmp_path / "server.log").read_text()


def test_upload_url_receives_the_tarball_intact(tmp_path, photos, loopback):
    """With --upload-url the server PUTs the output there and returns its URL, rather than
    inlining it (docs/http.md: the way to serve real, 2 GB outputs)."""
    import torch

    scratch = tmp_path / "server-tmp"
    scratch.mkdir()
    server = Server(scratch, tmp_path / "server.log", "--upload-url", loopback.url + "/upload/")
    try:
        status, result = server.predict(dict(TINY, instance_data=data_uri(photos)))
    finally:
        server.stop()
    assert status == 200 and result["status"] == "succeeded", result.get("error")
    assert result["output"] == loopback.url + "/files/uploads/dreambooth-weights.tar"
    headers = loopback.uploads["dreambooth-weights.tar"]
    assert headers["content-type"] == "application/x-tar"
    tarball = loopback.folder / "uploads" / "dreambooth-weights.tar"
    assert tarball.stat().st_size == int(headers["content-length"])
    out = untar(tarball, tmp_path / "out")  # a truncated or corrupt tarball fails here
    assert len(read_training_json(out)["history"]) == 2
    # By default the smallest full model: what a diffusers loader reads, in fp16.
    assert {p.name for p in out.iterdir()} == {"model_index.json", "unet", "text_encoder", "vae",
                                               "tokenizer", "scheduler", "training.json",
                                               "README.md"}
    from safetensors.torch import load_file

    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in unet.values()} == {torch.float16}
