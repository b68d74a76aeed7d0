"""Downloading a file input from an http(s) URL, bounded in time and size, and interruptible
(predict.py's file inputs: Cog's own download has no deadline, no size limit, and ignores a
cancel).

    fetch("https://example.com/dog.zip", "dog.zip", max_bytes=64 << 30, timeout=3600)

A sender that stalls (no byte for `stall` seconds), trickles past the deadline, or sends more
than `max_bytes` (announced, or as it arrives) is refused with a UserError naming the host and
the limit; so is an error status or a redirect to anything but http(s). `fetch` downloads in a
thread of its own and waits in short steps, so the calling thread stays interruptible: a Cog
cancel (an exception Cog injects into the prediction's thread, delivered only while it runs
Python) or Ctrl-C stops it within a quarter of a second, and the partial file is removed.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from .cleanup import remove
from .errors import UserError, out_of_disk

CHUNK = 1 << 20


class _HttpOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would follow one to ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise UserError(f"redirected to {newurl.split(':')[0]}:, not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnly)


def fetch(url: str, path: str | os.PathLike, log=print, every: float = 10.0, **limits) -> int:
    """Download `url` into the file `path` (download's `limits`), logging its start, its
    progress `every` so many seconds and its end; returns its size. On any failure or
    interruption the file is removed and the download thread told to stop."""
    outcome: list = []
    stop = threading.Event()

    def work():
        try:
            with open(path, "wb") as dest:
                outcome.append(download(url, dest, stop=stop, **limits))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            outcome.append(e)
    worker = threading.Thread(target=work, name="download", daemon=True)
    try:
        log(f"downloading from {_host(url)}")
        worker.start()
        started = shown = time.monotonic()
        while worker.is_alive():
            worker.join(0.25)  # returns to Python often: a cancel is delivered at once
            if time.monotonic() - shown > every and worker.is_alive():
                shown = time.monotonic()
                log(f"{os.stat(path).st_size / 2**20:.1f} MiB downloaded "
                    f"({shown - started:.0f} s)")
        result = outcome[0]
        if isinstance(result, BaseException):
            if out_of_disk(result):
                raise UserError(f"ran out of disk space downloading {_host(url)} ({result}): "
                                f"free some space on the server") from None
            raise result
        log(f"downloaded {result / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s")
        return result
    except BaseException:
        stop.set()  # the worker stops at its next chunk, or when its read times out
        remove(path)
        raise


def download(url: str, dest, *, max_bytes: int, timeout: float, stall: float = 60.0,
             user_agent: str | None = None, stop: threading.Event | None = None) -> int:
    """Write what `url` serves into the binary file `dest`; returns the bytes written. Stops
    with an InterruptedError as soon as `stop` is set."""
    host = _host(url)
    stall = min(stall, timeout)
    deadline = time.monotonic() + timeout
    limit = f"{max_bytes >> 20} MiB"
    headers = {"User-Agent": user_agent} if user_agent else {}
    try:
        with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=stall) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise UserError(f"the file at {host} is {int(length) >> 20} MiB, over the "
                                f"{limit} a download may be")
            written = 0
            while chunk := response.read1(CHUNK):
                if stop is not None and stop.is_set():
                    raise InterruptedError("download stopped")
                written += len(chunk)
                if written > max_bytes:
                    raise UserError(f"the download from {host} passed the {limit} a download "
                                    f"may be")
                dest.write(chunk)
                if time.monotonic() > deadline:
                    raise UserError(f"the download from {host} took longer than the {timeout:g} "
                                    f"s allowed ({written >> 20} MiB arrived)")
            if length.isdigit() and written < int(length):
                raise UserError(f"the download from {host} broke off after {written} of "
                                f"{length} bytes")
            return written
    except urllib.error.HTTPError as e:
        raise UserError(f"{host} answered {e.code} {e.reason}") from None
    except (socket.timeout, TimeoutError):
        raise UserError(f"the download from {host} stalled: nothing arrived for {stall:g} s") \
            from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download from {host} ({reason})") from None


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).hostname or url[:50]
