"""The Cog HTTP server (coglet) in a subprocess on loopback, and the other side of the API: a
loopback HTTP server that serves files (hostile ones too), takes webhooks and uploads. The tests
of the trainer's server (test_http.py) and of the generator's (test_generate.py) use these.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil  # installed with accelerate

from helpers import ROOT

TIMEOUT = 300  # seconds for one synchronous training; the worker's first one is the slowest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method: str, url: str, payload=None, headers=None, timeout=TIMEOUT):
    """One HTTP request with a JSON body; returns (status, decoded JSON body or None)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    return status, json.loads(body) if body else None


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` until it returns something true, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def data_uri(path: Path) -> str:
    return "data:application/zip;base64," + base64.b64encode(path.read_bytes()).decode()


def untar_bytes(payload: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def inlined(output: str) -> bytes:
    header, payload = output.split(",", 1)
    assert header == "data:application/x-tar;base64"
    return base64.b64decode(payload)


@contextlib.contextmanager
def one_thread():
    """torch on one thread for a moment: on a busy 2-core machine two OpenMP threads spin
    against each other, and tiny's two sampling steps take 15 s instead of 0.1 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def trickle(handler):
    """1,000,000 bytes announced, one sent every 0.2 s: past any deadline."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000000")
    handler.end_headers()
    for _ in range(600):
        handler.wfile.write(b"\0")
        handler.wfile.flush()
        time.sleep(0.2)


def stall(handler):
    """Headers, then silence."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000000")
    handler.end_headers()
    handler.wfile.flush()
    time.sleep(120)


def huge(handler):
    """A 2 GiB file, announced (and never sent)."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(2 << 30))
    handler.end_headers()


def endless(handler):
    """Zeros without end, chunked: no length to refuse it by."""
    handler.protocol_version = "HTTP/1.1"
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    chunk = b"\0" * (1 << 20)
    for _ in range(1 << 12):
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))


def broken(handler):
    """1,000,000 bytes announced, 1,000 sent, then the connection closed."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000000")
    handler.end_headers()
    handler.wfile.write(b"\0" * 1000)
    handler.close_connection = True


def to_ftp(handler):
    """A redirect to ftp:, which urllib would follow (it refuses file: itself)."""
    handler.send_response(302)
    handler.send_header("Location", "ftp://127.0.0.1/x.zip")
    handler.end_headers()


def missing(handler):
    handler.send_error(404)


HOSTILE_SENDERS = {f.__name__: f for f in (trickle, stall, huge, endless, broken, to_ftp,
                                            missing)}


class Loopback:
    """A real HTTP server on 127.0.0.1 playing the other side of the API: it serves files
    (GET /files/NAME from `folder`), receives webhooks (POST /hook: JSON bodies kept in
    `events`) and takes uploads (PUT /upload/NAME, written to `folder/uploads/NAME`, answered
    201 with the file's URL in Location, as a storage bucket would)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.events: list[dict] = []
        self.requests: list[str] = []  # the paths of GET requests, in order
        self.uploads: dict[str, dict] = {}
        (folder / "uploads").mkdir(parents=True, exist_ok=True)
        loopback = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                kind = self.path.split("/")[1]
                loopback.requests.append(self.path)
                if kind in HOSTILE_SENDERS:
                    with contextlib.suppress(OSError):  # the client hung up: as it should
                        HOSTILE_SENDERS[kind](self)
                    return
                path = loopback.folder / self.path.removeprefix("/files/")
                if not self.path.startswith("/files/") or not path.is_file():
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                self.wfile.write(path.read_bytes())

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                loopback.events.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def do_PUT(self):
                name = self.path.removeprefix("/upload/")
                left = int(self.headers["Content-Length"])
                with open(loopback.folder / "uploads" / name, "wb") as f:
                    while left:  # streamed to disk: an upload is as big as the model
                        chunk = self.rfile.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        f.write(chunk)
                        left -= len(chunk)
                loopback.uploads[name] = {k.lower(): v for k, v in self.headers.items()}
                self.send_response(201)
                self.send_header("Location", f"{loopback.url}/files/uploads/{name}")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def webhooks(self, prediction: str) -> list[dict]:
        """The webhooks received for one prediction, in order."""
        return [e for e in list(self.events) if e.get("id") == prediction]

    def final(self, prediction: str, timeout=TIMEOUT) -> dict:
        """The webhook that ends the prediction (succeeded, failed or canceled)."""
        done = ("succeeded", "failed", "canceled")
        return wait_for(lambda: next((e for e in self.webhooks(prediction)
                                      if e["status"] in done), None),
                        timeout, f"the final webhook of {prediction}")

    def close(self):
        self.http.shutdown()
        self.http.server_close()


class Server:
    """`python -m cog.server.http` from the project root, as docs/http.md says to run it: BASE_MODEL
    tiny (unless `env` says otherwise), its own TMPDIR (where inputs are downloaded and the work
    and output folders go)."""

    def __init__(self, scratch: Path, log: Path, *args: str, predictor="predict.py:Predictor",
                 cwd: Path = ROOT, env: dict | None = None, command: list | None = None):
        self.scratch = scratch
        self.log_path = log
        self.base = f"http://127.0.0.1:{free_port()}"
        # One thread: tiny's ops gain nothing from two, and on a shared 2-core machine two
        # OpenMP threads spin against each other (a worker's first training: 15 s, not 7 s).
        env = {**os.environ, **dict(
            BASE_MODEL="tiny", COG_PREDICT_TYPE_STUB=predictor, PORT=self.base.rsplit(":", 1)[1],
            TMPDIR=str(scratch), PYTHONPATH=str(ROOT),
            PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
            OMP_NUM_THREADS="1", PYTHON=sys.executable), **(env or {})}
        self.log = open(log, "w")
        # `command` (e.g. script/serve generate) instead of the server module itself.
        self.process = subprocess.Popen(
            [*(command or [sys.executable, "-m", "cog.server.http"]), "--host", "127.0.0.1",
             *args], cwd=cwd,
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(self.ready, 120, f"the Cog server to be READY (log: {log})")
        except BaseException:
            self.stop()
            raise

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the Cog server exited; see {self.log_path}")
        with contextlib.suppress(OSError):
            return call("GET", self.base + "/health-check", timeout=2)[1]["status"] == "READY"
        return False

    def predict(self, inputs: dict, headers=None, **request):
        return call("POST", self.base + "/predictions", {"input": inputs, **request}, headers)

    def start(self, inputs: dict, **request) -> str:
        """Start a prediction asynchronously (webhooks report on it); returns its id."""
        status, accepted = self.predict(inputs, headers={"Prefer": "respond-async"}, **request)
        assert status == 202 and accepted["status"] == "starting", accepted
        return accepted["id"]

    def rss_mib(self) -> int:
        """Resident memory of the server and its worker process, together."""
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) >> 20

    def work_folders(self) -> list[str]:
        """train.run's work folders (dreambooth-XXXX); predict.py's output and input folders
        excluded."""
        return [p.name for p in self.scratch.iterdir() if p.name.startswith("dreambooth-")
                and not p.name.startswith(("dreambooth-out-", "dreambooth-in-"))]

    def inputs(self) -> list[str]:
        """The files in the temp folder or predict.py's input folder: the inputs it fetched
        (and, were it Cog fetching them, Cog's temp files)."""
        return [p.name for p in [*self.scratch.glob("dreambooth-in-*/*"),
                                 *self.scratch.glob("tmp*")]]

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()
