"""Archive intake: turn a user's ZIP (or folder) of photos into RGB images and a report.

    python -m train.intake photos.zip      # prints what would be trained on and what is skipped

Images are found in nested folders; macOS metadata (`__MACOSX/`, `._x.jpg`), hidden files and
anything that does not open as an image are skipped with the reason. EXIF orientation is applied,
transparency is composited onto white, and every image becomes RGB. Two files with the same name
in different folders are both kept: each is reported by its full path in the archive. Large
photos are downscaled at intake so that 20 twelve-megapixel photos do not sit in memory.
Nothing is extracted to disk; no model is loaded. Errors are `UserError`s that say what to fix.
"""

from __future__ import annotations

import io
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, ImageOps, UnidentifiedImageError

from .config import UserError

MAX_FILE_BYTES = 256 << 20  # no photo is this large; a larger entry is a bomb or a video
MAX_ASPECT = 8  # a 1x20000 strip would be scaled to gigapixels at the training resolution
# What a damaged, encrypted or exotic archive entry or image raises while read and decoded.
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error,
              NotImplementedError, RuntimeError)


@dataclass
class Example:
    """One training image: where it came from, its caption, its original size, the pixels."""
    file: str
    caption: str
    size: tuple[int, int]
    image: Image.Image

    def report(self) -> dict:
        return {"file": self.file, "caption": self.caption, "size": list(self.size)}


def read_images(source: str | Path, role: str, caption: str, resolution: int,
                limit: int | None = None) -> tuple[list[Example], list[dict]]:
    """Read the images of a ZIP or folder. Returns (examples, skipped); `skipped` holds
    {"file", "reason"} per file left out. Keeps at most `limit` images (in path order)."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{role}: {source} does not exist")
    entries = _folder_entries(path) if path.is_dir() else _zip_entries(path, role)
    examples, skipped = [], []
    for name, nbytes, read in entries:
        reason = _skip_reason(name)
        if reason is None and nbytes > MAX_FILE_BYTES:
            reason = f"larger than {MAX_FILE_BYTES >> 20} MiB"
        if reason is None and limit is not None and len(examples) >= limit:
            reason = f"beyond the {limit} images asked for"
        if reason is None:
            try:
                image, size = _load_image(read(), resolution)
            except UnidentifiedImageError:
                reason = "not an image"
            except Image.DecompressionBombError:
                reason = "too many pixels"
            except UNREADABLE as e:
                reason = f"unreadable ({e})"
        if reason is None and max(size) > MAX_ASPECT * min(size):
            reason = f"{size[0]}x{size[1]} is too narrow (at most {MAX_ASPECT}:1)"
        if reason:
            skipped.append({"file": name, "reason": reason})
        else:
            examples.append(Example(name, caption, size, image))
    return examples, skipped


def require_images(examples: list[Example], skipped: list[dict], role: str) -> None:
    """Refuse an archive with no usable image, listing what was found."""
    if examples:
        return
    if not skipped:
        raise UserError(f"{role}: the archive is empty; put 3-20 photos of the subject in a ZIP")
    found = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:10])
    more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    raise UserError(f"{role}: no usable images among {len(skipped)} files ({found}{more}); "
                    f"send JPEG or PNG photos")


def _zip_entries(path: Path, role: str):
    if not zipfile.is_zipfile(path):
        raise UserError(f"{role}: {path.name} is not a ZIP archive; zip your photos "
                        f"(e.g. `zip photos.zip *.jpg`) and send that")
    try:
        archive = zipfile.ZipFile(path)
        infos = sorted((i for i in archive.infolist() if not i.is_dir()),
                       key=lambda i: i.filename)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{role}: {path.name} is a damaged ZIP archive ({e})") from None
    for info in infos:
        yield info.filename, info.file_size, lambda info=info: archive.read(info)


def _folder_entries(path: Path):
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        yield file.relative_to(path).as_posix(), file.stat().st_size, file.read_bytes


def _skip_reason(name: str) -> str | None:
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts:
        return "unsafe path"
    if "__MACOSX" in parts:
        return "macOS metadata"
    if any(p.startswith(".") for p in parts):
        return "hidden file"
    return None


def _load_image(data: bytes, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image)
    size = image.size
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Alpha composited onto white, so transparent areas do not turn black.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    image = image.convert("RGB")
    # Keep the shorter side at least `resolution`: training resizes to exactly that later.
    scale = resolution / min(image.size)
    if scale < 1:
        new = (max(resolution, round(image.width * scale)), max(resolution,
                                                                round(image.height * scale)))
        image = image.resize(new, Image.Resampling.LANCZOS)
    return image, size


if __name__ == "__main__":
    found, left_out = read_images(sys.argv[1], "instance_data", "<instance_prompt>", 512)
    for ex in found:
        print(f"use   {ex.file}  {ex.size[0]}x{ex.size[1]}")
    for s in left_out:
        print(f"skip  {s['file']}  ({s['reason']})")
