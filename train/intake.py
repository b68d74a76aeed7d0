"""Archive intake: turn what a user sent into RGB images and a report of what was used and why not.

    python -m train.intake photos.zip      # prints what would be trained on and what is skipped

`instance_data` may be a ZIP, a tar (plain, gzip, bzip2 or xz), a single image, or (CLI) a folder,
recognised by content, not by name: presigned URLs carry no extension. Nothing is extracted to
disk: members are read into memory one at a time, so no entry name can write anywhere.
Symlinks, hard links and device files are never followed; `..` and absolute names, macOS
metadata (`__MACOSX/`, `._x.jpg`), hidden files, `Thumbs.db` and `desktop.ini` are skipped with
the reason. Limits on entry count, total size and compression ratio refuse archive bombs: a
ZIP from its central directory before anything is inflated, a compressed tar while it is
decompressed (once, into a spooled temporary file, counting bytes and checking header sizes).

What is an image is decided by opening it: JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC/HEIF and AVIF.
EXIF orientation is applied; embedded colour profiles converted to sRGB; transparency composited
onto a background colour; CMYK, 16-bit and grayscale converted; animations give their first
frame. Pixel bombs are refused from the header, before decoding; big JPEGs are decoded at a
reduced scale when that still covers the training resolution. Errors are `UserError`s.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import re
import sys
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageCms, ImageColor, ImageOps, UnidentifiedImageError

from .errors import UserError

try:  # HEIC/HEIF, as iPhones take them; optional so that intake never fails to import
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover
    pass

MAX_FILE_BYTES = 256 << 20  # no photo is this large; a larger entry is a bomb or a video
MAX_ASPECT = 8  # a 1x20000 strip would be scaled to gigapixels at the training resolution
JUNK_NAMES = {"thumbs.db", "desktop.ini", ".ds_store"}
# What a damaged, encrypted or exotic archive entry or image raises while read and decoded.
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error,
              NotImplementedError, RuntimeError, tarfile.TarError)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclass
class Limits:
    """What one archive may hold; past these it is refused as a likely bomb."""
    max_files: int = 10000
    max_bytes: int = 4 << 30
    max_ratio: float = 200.0
    max_pixels: int = 100_000_000
    advice: str = "send only the photos"  # what a refusal tells the user to do


@dataclass
class Example:
    """One training image: where it came from, its caption, its original size, the pixels."""
    file: str
    caption: str
    size: tuple[int, int]
    image: Image.Image
    notes: list[str] = field(default_factory=list)
    concept: int = 0  # which subject, when a run has several

    def report(self) -> dict:
        record = {"file": self.file, "caption": self.caption, "size": list(self.size),
                  "concept": self.concept}
        return dict(record, notes=self.notes) if self.notes else record


def read_images(source: str | Path, role: str, caption: str, resolution: int,
                limit: int | None = None, limits: Limits = Limits(), background: str = "white",
                words: tuple[str, str] | None = None, folder: str = "",
                concept: int = 0, folder_captions: bool = False
                ) -> tuple[list[Example], list[dict]]:
    """Read the images of an archive, image or folder (only those under `folder` inside it,
    when given). Returns (examples, skipped); `skipped` holds {"file", "reason"} per file left
    out. Keeps at most `limit` images (in name order).

    Each image's caption is `caption` unless the archive gives it one: a sidecar `name.txt` or
    `name.caption` beside it, or text after `@` in its file name (`img-1@a photo of S.jpg`).
    With `words` = (identifier, class noun), a whole-word S or C in those captions stands for
    them. With `folder_captions` (JoePenna's convention), folders say more: `bingo/x.jpg` is
    "bingo C", `bingo/dog/x.jpg` "bingo dog", `bingo/dog/a picture of/x.jpg` "a picture of
    bingo dog", and S and C follow the folders too."""
    path = input_path(source, role)
    backdrop = ImageColor.getrgb(background)[:3]
    entries = list(_entries(path, role, limits))
    if folder:
        inside = [e for e in entries if _in_folder(e[0], (folder,))]
        if not inside:
            tops = sorted({_bare(e[0]).split("/")[0] + "/" for e in entries
                           if "/" in _bare(e[0])})
            raise UserError(f"{role}: no files under {folder}/ in the archive (its top-level "
                            f"folders: {', '.join(tops[:10]) or 'none'})")
        entries = inside
    sidecars = _sidecars(entries)
    readers = {n: read for n, _, read in entries}
    examples, skipped = [], []
    for name, reason, read in entries:
        if name in sidecars.values():
            continue  # a caption file, reported with its image
        if reason is None and limit is not None and len(examples) >= limit:
            reason = f"beyond the {limit} images asked for"
        if reason is None:
            try:
                example = _load_image(read(), name, caption, resolution, limits.max_pixels,
                                      backdrop)
            except UnidentifiedImageError:
                reason = "not an image"
            except Image.DecompressionBombError as e:
                reason = f"too many pixels ({e})"
            except UNREADABLE as e:
                reason = f"unreadable ({e})"
        if reason is None and max(example.size) > MAX_ASPECT * min(example.size):
            reason = f"{example.size[0]}x{example.size[1]} is too narrow (at most {MAX_ASPECT}:1)"
        if reason:
            skipped.append({"file": name, "reason": reason})
            continue
        here = words
        if folder_captions and words:
            here, group = _folder_words(name, folder, words)
            if group is not None:
                example.caption = group
        own, reason = _caption_of(name, sidecars, readers)
        if reason:
            skipped.append({"file": name, "reason": reason})
            continue
        if own:
            example.caption = _substitute(own, here)
        example.concept = concept
        examples.append(example)
    return examples, skipped


def prompt_words(instance_prompt: str, class_prompt: str | None) -> tuple[str, str]:
    """(identifier, class noun) from the prompts: the class noun is the class prompt's last
    word, the identifier the word before it in the instance prompt ("a photo of sks dog",
    "a photo of a dog" -> ("sks", "dog")); without a class prompt, the instance prompt's last
    two words."""
    words = re.findall(r"[\w'-]+", instance_prompt)
    noun = (re.findall(r"[\w'-]+", class_prompt or "") or words or [""])[-1]
    lowered = [w.lower() for w in words]
    if noun.lower() in lowered[1:]:
        return words[lowered.index(noun.lower(), 1) - 1], noun
    return (words[-1] if words else "", noun)


CAPTION_SUFFIXES = (".txt", ".caption")
MAX_CAPTION_BYTES = 64 << 10  # a caption is a line of text; more is not a caption


def _sidecars(entries) -> dict[str, str]:
    """Image entry name -> its caption file's name, for `x.jpg` beside `x.txt`/`x.caption`
    (matched on the names as stored, so `./x.jpg` pairs with `./x.txt`; suffixes in any case)."""
    captions = {}
    for name, reason, _ in entries:
        stem, dot, suffix = name.rpartition(".")
        if reason is None and dot and "." + suffix.lower() in CAPTION_SUFFIXES:
            captions.setdefault(stem, name)
    found = {}
    for name, reason, _ in entries:
        stem, dot, suffix = name.rpartition(".")
        if (reason is None and dot and "/" not in suffix and stem in captions
                and "." + suffix.lower() not in CAPTION_SUFFIXES):
            found[name] = captions[stem]
    return found


def _caption_of(name: str, sidecars: dict[str, str], readers: dict) -> tuple[str | None,
                                                                             str | None]:
    """(the caption an image's archive gives it or None, the reason to skip the image or None)."""
    if name in sidecars:
        try:
            data = readers[sidecars[name]]()
        except UNREADABLE:
            return None, None  # a damaged caption file: the image keeps the default caption
        if len(data) > MAX_CAPTION_BYTES:
            return None, (f"its caption file {sidecars[name]} holds {len(data)} bytes; a caption "
                          f"is at most {MAX_CAPTION_BYTES >> 10} KiB of text")
        return " ".join(data.decode("utf-8", errors="replace").split()) or None, None
    stem = PurePosixPath(name).stem
    if "@" in stem:
        return " ".join(stem.split("@", 1)[1].split()) or None, None
    return None, None


def _folder_words(name: str, folder: str, words: tuple[str, str]):
    """((identifier, class noun), caption or None) for an image under JoePenna's folders."""
    inner = _bare(name).removeprefix(folder + "/") if folder else name
    dirs = PurePosixPath(inner).parts[:-1]
    if not dirs:
        return words, None
    identifier = dirs[0]
    noun = dirs[1] if len(dirs) > 1 else words[1]
    prefix = " ".join(dirs[2:])
    return (identifier, noun), " ".join(f"{prefix} {identifier} {noun}".split())


def _substitute(caption: str, words: tuple[str, str] | None) -> str:
    if not words:
        return caption
    identifier, noun = words  # functions, not strings: a folder name may hold a backslash
    caption = re.sub(r"\bS\b", lambda _: identifier, caption)
    return re.sub(r"\bC\b", lambda _: noun, caption)


def outside_folders(source: str | Path, role: str, folders: list[str],
                    limits: Limits = Limits()) -> list[dict]:
    """Skip records for the files of an archive that lie in none of `folders`."""
    return [{"file": name, "reason": "outside every concept folder"}
            for name, _, _ in _entries(Path(source), role, limits)
            if not _in_folder(name, folders)]


def _bare(name: str) -> str:
    """A member name without the `./` that `tar cf a.tar .` puts in front of every entry."""
    return name.removeprefix("./")


def _in_folder(name: str, folders) -> bool:
    return _bare(name).startswith(tuple(folder + "/" for folder in folders))


def require_images(examples: list[Example], skipped: list[dict], role: str) -> None:
    """Refuse an archive with no usable image, listing what was found."""
    if examples:
        return
    if not skipped:
        raise UserError(f"{role}: the archive is empty; put 3-20 photos of the subject in a ZIP")
    found = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:10])
    more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    raise UserError(f"{role}: no usable images among {len(skipped)} files ({found}{more}); "
                    f"send JPEG, PNG, WebP or HEIC photos")


def input_path(source: str, role: str,
               wanted: str = "a ZIP or tar archive, an image or a folder") -> Path:
    """The path of a file or folder the user named, checked before anything opens it: a FIFO, a
    device or a socket is refused here (opening a FIFO to read waits for a writer forever)."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{role}: {source} does not exist")
    if not (path.is_dir() or path.is_file()):  # both follow links, to what is really read
        raise UserError(f"{role}: {source} is not a file or a folder (it is a FIFO, a device "
                        f"or a socket): give {wanted}")
    return path


def looks_like_tar(path: Path) -> bool:
    """Whether a file starts as a tar archive does (plain, or gzip/bz2/xz-compressed), from its
    first (decompressed) header block alone: tarfile.is_tarfile reads the whole file to decide,
    over a minute for 512 MiB of zeros, which it then takes for an empty tar."""
    opener = decompressor(path)
    try:
        with (opener(path) if opener else open(path, "rb")) as f:
            block = f.read(512)
            if block == bytes(512):  # an empty tar is its end marker: a few zero blocks only
                rest = f.read(20480)
                return len(rest) < 20480 and not any(rest)
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")  # checks the checksum
        return True
    except (lzma.LZMAError, *UNREADABLE):
        return False


# --- Archives ------------------------------------------------------------------------------

def _entries(path: Path, role: str, limits: Limits):
    """(name, skip reason or None, read) for every file, whatever the container."""
    if path.is_dir():
        return _folder_entries(path)
    if zipfile.is_zipfile(path):
        return _zip_entries(path, role, limits)
    if looks_like_tar(path):
        return _tar_entries(path, role, limits)
    try:
        with Image.open(path):
            pass
    except Image.DecompressionBombError:
        pass  # an image, and too large: skipped with that reason below
    except (UnidentifiedImageError, *UNREADABLE):
        raise UserError(f"{role}: {path.name} is not a ZIP or tar archive, nor an image; zip "
                        f"your photos (e.g. `zip photos.zip *.jpg`) and send that") from None
    return iter([(path.name, _name_reason(path.name, path.stat().st_size), path.read_bytes)])


def _zip_entries(path: Path, role: str, limits: Limits):
    try:
        archive = zipfile.ZipFile(path)
        infos = sorted((i for i in archive.infolist() if not i.is_dir()),
                       key=lambda i: i.filename)
    except UNREADABLE as e:
        raise UserError(f"{role}: {path.name} is a damaged ZIP archive ({e})") from None
    # Sizes come from the central directory: a bomb is refused before anything is inflated,
    # and reading never returns more than an entry's declared size.
    _check_limits(role, path, len(infos), sum(i.file_size for i in infos), limits)
    for info in infos:
        if info.flag_bits & 0x1:
            yield info.filename, "encrypted: send an archive without a password", None
        else:
            yield (info.filename, _name_reason(info.filename, info.file_size),
                   lambda info=info: archive.read(info))


def _tar_entries(path: Path, role: str, limits: Limits):
    for member, stream in tar_members(path, role, limits):
        if member.issym() or member.islnk():
            yield member.name, "a link (links are never followed)", None
        elif not member.isfile():
            yield member.name, "not a regular file", None
        else:
            yield (member.name, _name_reason(member.name, member.size),
                   lambda stream=stream: stream().read())


def tar_members(path: Path, role: str, limits: Limits):
    """(TarInfo, stream) for each member of a tar archive (plain or compressed) but folders, in
    name order, once the archive has passed `limits`: its file count, expanded size and
    compression ratio (a bomb stops decompressing at the size limit). `stream()` opens a
    regular file's bytes. The photo intake reads archives this way; so does resume."""
    plain = _plain_tar(path, role, limits)
    try:
        archive = tarfile.open(fileobj=plain, mode="r:")
        members = []
        headers = 0
        for member in archive:  # headers only; stop early on a flood of entries
            headers += 1
            if not member.isdir():
                members.append(member)
            if headers > limits.max_files:
                break
    except UNREADABLE as e:
        raise UserError(f"{role}: {path.name} is a damaged tar archive ({e})") from None
    _check_limits(role, path, headers, sum(m.size for m in members if m.isfile()), limits)
    for member in sorted(members, key=lambda m: m.name):
        yield member, lambda member=member: archive.extractfile(member)


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member cannot be unpacked as one of a folder's files, if it cannot: a link
    (never followed), a path outside the folder, or something not a regular file."""
    if member.issym() or member.islnk():
        return "a link"
    if unsafe_path(member.name):
        return "a path outside its folder"
    if not member.isfile():
        return "something not a file"
    return None


def unsafe_path(name: str) -> bool:
    """Whether an archive member's name would land outside the folder it is extracted into."""
    parts = PurePosixPath(name).parts
    return not parts or name.startswith("/") or ".." in parts


TAR_MAGIC = {b"\x1f\x8b": gzip.GzipFile, b"BZh": bz2.BZ2File, b"\xfd7zXZ\x00": lzma.LZMAFile}


def decompressor(path: Path):
    """The file class that decompresses `path` (gzip, bz2, xz, by its first bytes), or None."""
    with path.open("rb") as file:
        head = file.read(6)
    return next((cls for magic, cls in TAR_MAGIC.items() if head.startswith(magic)), None)
MAX_HEADER_BYTES = 1 << 20  # long-name and pax headers are a few hundred bytes in real archives


def _plain_tar(path: Path, role: str, limits: Limits):
    """The archive as an uncompressed, seekable tar: decompressed once, counting every byte, so
    a bomb stops at the size limit and members can then be read in any order without
    re-decompressing. Headers are walked before tarfile parses them: tarfile would hold a
    gigabyte "long name" in memory."""
    opener = decompressor(path)
    if opener is None:
        plain = path.open("rb")
    else:
        plain = tempfile.SpooledTemporaryFile(max_size=64 << 20)
        budget = limits.max_bytes + min(limits.max_bytes, 64 << 20)  # data, plus headers
        try:
            with opener(path) as stream:
                while chunk := stream.read(1 << 20):
                    plain.write(chunk)
                    if plain.tell() > budget:
                        raise UserError(f"{role}: {path.name} expands past "
                                        f"{limits.max_bytes >> 20} MiB; {limits.advice}")
        except UserError:  # a ValueError too: not to be taken for a damaged archive
            raise
        except UNREADABLE + (lzma.LZMAError,) as e:
            raise UserError(f"{role}: {path.name} is a damaged archive ({e})") from None
        plain.seek(0)
    offset, end = 0, plain.seek(0, 2)
    while offset + 512 <= end:  # 512-byte headers, each followed by its data rounded to 512
        plain.seek(offset)
        header = plain.read(512)
        if header == b"\0" * 512:
            break
        try:
            size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
        except ValueError:
            break  # tarfile will say what is wrong with it
        if header[156:157] in (b"L", b"K", b"x", b"g") and size > MAX_HEADER_BYTES:
            raise UserError(f"{role}: {path.name} has a {size >> 20} MiB entry header; refused "
                            f"as a likely archive bomb")
        offset += 512 + (size + 511) // 512 * 512
    plain.seek(0)
    return plain


def _folder_entries(path: Path):
    for file in sorted(p for p in path.rglob("*") if not p.is_dir()):
        name = file.relative_to(path).as_posix()
        if file.is_symlink() or not file.is_file():
            yield name, "a link or special file (never followed)", None
        else:
            yield name, _name_reason(name, file.stat().st_size), file.read_bytes


def _check_limits(role: str, path: Path, count: int, total: int, limits: Limits) -> None:
    if count > limits.max_files:
        raise UserError(f"{role}: {path.name} holds more than {limits.max_files} files; "
                        f"{limits.advice}")
    if total > limits.max_bytes:
        raise UserError(f"{role}: {path.name} would expand to {total >> 20} MiB, over the "
                        f"{limits.max_bytes >> 20} MiB limit; {limits.advice}")
    ratio = total / max(path.stat().st_size, 1)
    if ratio > limits.max_ratio:
        raise UserError(f"{role}: {path.name} expands {ratio:.0f} times (limit "
                        f"{limits.max_ratio:.0f}): refused as a likely archive bomb")


def _name_reason(name: str, nbytes: int) -> str | None:
    if unsafe_path(name):
        return "unsafe path"
    parts = PurePosixPath(name).parts
    if "__MACOSX" in parts:
        return "macOS metadata"
    if parts and parts[-1].lower() in JUNK_NAMES:
        return "system file"
    if any(p.startswith(".") for p in parts):
        return "hidden file"
    if nbytes > MAX_FILE_BYTES:
        return f"larger than {MAX_FILE_BYTES >> 20} MiB"
    return None


# --- Images --------------------------------------------------------------------------------

def _load_image(data: bytes, name: str, caption: str, resolution: int, max_pixels: int,
                background: tuple[int, int, int]) -> Example:
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:  # from the header: nothing decoded yet
        raise Image.DecompressionBombError(f"{width}x{height}, limit {max_pixels // 10**6} Mpx")
    notes = []
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"first frame of {image.n_frames}")
    if image.format == "JPEG":
        # Decode at 1/2, 1/4 or 1/8 scale when that still covers the training resolution.
        scale = resolution / min(width, height)
        if scale < 0.5:
            image.draft("RGB", (round(width * scale), round(height * scale)))
    orientation = image.getexif().get(0x0112, 1)
    image = ImageOps.exif_transpose(image)
    if orientation not in (1, None):
        notes.append(f"rotated (EXIF orientation {orientation})")
    size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    image, note = _to_rgb(image, background)
    if note:
        notes.append(note)
    # Keep the shorter side at least `resolution`: training resizes to exactly that later.
    scale = resolution / min(image.size)
    if scale < 1:
        image = image.resize((max(resolution, round(image.width * scale)),
                              max(resolution, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    if min(size) < resolution / 2:
        notes.append(f"small: {size[0]}x{size[1]} is under half the {resolution} px training "
                     f"resolution and will look soft")
    return Example(name, caption, size, image, notes)


def _to_rgb(image: Image.Image, background: tuple[int, int, int]):
    """RGB pixels in sRGB, and a note of what was converted (or None)."""
    note = None
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels * 255.0 / top, 0, 255).astype(np.uint8))
        note = f"converted from {mode} (high bit depth)"
    icc = image.info.get("icc_profile")
    if icc and image.mode in ("RGB", "RGBA", "CMYK", "L"):
        try:  # e.g. Display P3 from phones, or CMYK print profiles: convert to sRGB
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            target_mode = "RGBA" if image.mode == "RGBA" else "RGB"
            image = ImageCms.profileToProfile(image, source, SRGB, outputMode=target_mode)
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain conversion below
    if mode == "CMYK":
        note = "converted from CMYK"
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, background + (255,))
        image = Image.alpha_composite(backdrop, rgba)
        note = f"transparency composited on {'#%02x%02x%02x' % background}"
    return image.convert("RGB"), note


if __name__ == "__main__":
    found, left_out = read_images(sys.argv[1], "instance_data", "<instance_prompt>", 512)
    for ex in found:
        print(f"use   {ex.file}  {ex.size[0]}x{ex.size[1]}  {'; '.join(ex.notes)}")
    for s in left_out:
        print(f"skip  {s['file']}  ({s['reason']})")
