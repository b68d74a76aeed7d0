"""Download throughput: the server's bounded, cancellable download (train.download.fetch)
against the one Cog would do (requests, streamed through shutil.copyfileobj), from a loopback
HTTP server, so that the bounds cost nothing a user would see.

    .venv/bin/python -m bench.download --mib 512 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from train.download import fetch


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def cog_download(url: str, dest: Path) -> None:
    """What cog.types.URLPath.convert does with a URL."""
    import requests

    response = requests.get(url, stream=True, timeout=10)
    response.raw.decode_content = True
    with open(dest, "wb") as f:
        shutil.copyfileobj(response.raw, f)


def measure(mib: int, rounds: int) -> list[dict]:
    """MiB/s of each download of a `mib` MiB file, `rounds` times, alternating."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with open(folder / "file.bin", "wb") as f:
            for _ in range(mib):
                f.write(bytes(range(256)) * 4096)
        server = ThreadingHTTPServer(("127.0.0.1", 0),
                                     functools.partial(_Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/file.bin"
        ways = {"cog": lambda dest: cog_download(url, dest),
                "fetch": lambda dest: fetch(url, dest, log=lambda _: None, max_bytes=mib << 21,
                                            timeout=3600)}
        try:
            for n in range(rounds):
                for name, way in ways.items():
                    dest = folder / f"{name}.out"
                    started = time.perf_counter()
                    way(dest)
                    seconds = time.perf_counter() - started
                    assert dest.stat().st_size == mib << 20
                    dest.unlink()
                    rows.append({"round": n, "download": name, "mib_per_s": mib / seconds})
        finally:
            server.shutdown()
            server.server_close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.download",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="size of the file")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for row in measure(args.mib, args.rounds):
        print(f"round {row['round']}: {row['download']:5} {row['mib_per_s']:7.0f} MiB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
