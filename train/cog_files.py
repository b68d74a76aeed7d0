"""File inputs of the Cog predictors (predict.py, generate.py): taken only as the client sent
them, and downloaded by the prediction itself, within bounds, where a cancel reaches it.

    from train import cog_files            # importing it replaces Cog's URLPath.convert
    path = cog_files.client_file("instance_data", value)   # in predict(): a local path
    cog_files.clear()                      # in predict()'s finally: the inputs are removed

A file input is a data: URI (Cog decodes it; it is copied out at once) or an http(s) URL (only
noted when Cog converts it, and downloaded by client_file within MAX_DOWNLOAD_MIB and
DOWNLOAD_TIMEOUT, environment variables of the server). Anything else (a path on the server, a
folder, a file:// URL) is refused with one line, without looking at what it names.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import urllib.parse
from typing import Optional

from cog import Path, URLPath

from .cleanup import remove
from .download import fetch
from .errors import UserError

# The file inputs of the prediction under way: (the Path convert returned, the URL client_file
# downloads into it, or None for a data: URI, copied there at once). Cog (coglet) hands predict()
# a URL or data: URI as the Path that URLPath.convert returned, in this process; it hands over
# any other string as it came, so a client could name a file of the server. Keeping the very
# objects convert made lets predict() tell the two apart without opening, or even stat()ing,
# anything the client named; a Cog that stopped calling convert would fail closed (every file
# refused), not open.
_fetched: list[tuple[Path, Optional[str]]] = []
# Where they are put: a folder of this process (cleanup.remove_leftovers knows its name),
# emptied after every prediction whatever Cog does with its own copies.
INPUTS = Path(tempfile.gettempdir()) / f"dreambooth-in-{os.getpid()}-files"
# Bounds on a download (Cog's own has none), set in the server's environment.
MAX_DOWNLOAD_MIB = int(os.environ.get("MAX_DOWNLOAD_MIB", 64 << 10))
DOWNLOAD_TIMEOUT = float(os.environ.get("DOWNLOAD_TIMEOUT", 3600))


def _convert(self: URLPath) -> Path:
    """Cog's URLPath.convert, which downloads before predict() starts, in a thread a cancel
    never reaches, with no deadline or size limit. Here a data: URI (decoded by Cog already) is
    copied out at once, and an http(s) URL only noted: predict() downloads it (client_file)."""
    if self._path is None:
        INPUTS.mkdir(mode=0o700, exist_ok=True)
        if INPUTS.is_symlink() or INPUTS.stat().st_uid != os.getuid():
            raise RuntimeError(f"{INPUTS} is not this server's folder")
        # Under the name the client gave it (the URL's, or file.zip for a data: URI), so that
        # errors name the file the client knows; a folder of its own keeps names apart.
        folder = tempfile.mkdtemp(dir=INPUTS)
        name = os.path.join(folder, self.filename if self.filename.strip(".") else "file")
        url = self.source if urllib.parse.urlsplit(self.source).scheme in ("http",
                                                                         "https") else None
        try:
            with open(name, "xb") as dest:
                if url is None:
                    shutil.copyfileobj(self.fileobj, dest)
        except BaseException:
            remove(folder)
            raise
        self._path = Path(name)
        _fetched.append((self._path, url))
    return self._path


URLPath.convert = _convert


def source(name: str, value) -> tuple[str, Optional[str]]:
    """(local path, URL or None for a data: URI) of file input `name`, if it came from the
    client for this prediction, without downloading anything; a UserError, the same whatever
    `value` names on the server, for anything else."""
    urls = [url for path, url in _fetched if value is path]
    if not urls or not stat.S_ISREG(os.lstat(value).st_mode):
        raise UserError(f"{name}: send the file itself, as an http(s) URL or a data: URI; the "
                        f"server does not read files by their path on the server")
    return str(value), urls[0]


def client_file(name: str, value) -> Optional[str]:
    """The local path of file input `name` if it came from the client for this prediction,
    downloaded now if it is a URL (bounded, and a cancel stops it); see source()."""
    if value is None:
        return None
    path, url = source(name, value)
    if url:
        download(name, url, path)
    return path


def download(name: str, url: str, path: str) -> None:
    """Download `url` to `path` within the server's bounds, logging progress as `name`."""
    try:
        fetch(url, path, log=lambda line: print(f"{name}: {line}", flush=True),
              max_bytes=MAX_DOWNLOAD_MIB << 20, timeout=DOWNLOAD_TIMEOUT,
              user_agent=os.environ.get("COG_USER_AGENT"))
    except UserError as e:
        raise UserError(f"{name}: {e}") from None


def clear() -> None:
    """Remove this prediction's inputs (and any a failed or canceled one before it left)."""
    for path in INPUTS.glob("*"):
        remove(path)
    _fetched.clear()
