"""Archive intake: the right images found, the rest skipped with a reason, clear errors."""

import io
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from helpers import image_bytes, make_zip
from train import UserError
from train.intake import Limits, read_images, require_images


def read(path, resolution=64):
    return read_images(path, "instance_data", "a photo of sks dog", resolution)


def test_nested_images_found_and_junk_skipped(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {
        "IMG_1.jpg": image_bytes(),
        "deep/er/still/IMG_2.png": image_bytes(fmt="PNG"),
        "__MACOSX/deep/._IMG_2.png": b"\x00\x05\x16\x07 AppleDouble",
        "._IMG_1.jpg": b"\x00\x05\x16\x07",
        ".hidden/IMG_3.jpg": image_bytes(),
        "notes.txt": b"my dog photos",
        "photo.jpg": b"not really a jpeg",
    })
    examples, skipped = read(archive)
    assert [e.file for e in examples] == ["IMG_1.jpg", "deep/er/still/IMG_2.png"]
    assert all(e.caption == "a photo of sks dog" and e.image.mode == "RGB" for e in examples)
    reasons = {s["file"]: s["reason"] for s in skipped}
    assert reasons == {"__MACOSX/deep/._IMG_2.png": "macOS metadata",
                       "._IMG_1.jpg": "hidden file", ".hidden/IMG_3.jpg": "hidden file",
                       "notes.txt": "not an image", "photo.jpg": "not an image"}


def test_same_name_in_two_folders_both_kept(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"day1/IMG_0001.jpg": image_bytes((255, 0, 0)),
                                            "day2/IMG_0001.jpg": image_bytes((0, 0, 255))})
    examples, _ = read(archive)
    assert [e.file for e in examples] == ["day1/IMG_0001.jpg", "day2/IMG_0001.jpg"]
    assert examples[0].image.getpixel((5, 5))[0] > 200
    assert examples[1].image.getpixel((5, 5))[2] > 200


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone photo taken upright
    archive = make_zip(tmp_path / "a.zip", {"phone.jpg": image_bytes(size=(80, 64), exif=exif)})
    (example,), _ = read(archive)
    assert example.size == (64, 80)
    assert example.image.size == (64, 80)


def test_transparency_composited_on_white_and_modes_become_rgb(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {
        "clear.png": image_bytes((0, 0, 0, 0), fmt="PNG", mode="RGBA"),
        "gray.png": image_bytes(128, fmt="PNG", mode="L"),
    })
    clear, gray = read(archive)[0]
    assert clear.image.getpixel((3, 3)) == (255, 255, 255)
    assert gray.image.mode == "RGB" and gray.image.getpixel((3, 3)) == (128, 128, 128)


def test_large_photos_downscaled_to_the_training_resolution(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"big.jpg": image_bytes(size=(800, 600))})
    (example,), _ = read(archive, resolution=64)
    assert example.size == (800, 600)
    assert min(example.image.size) == 64 and example.image.size[0] == 85


def test_a_folder_works_like_a_zip(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(image_bytes())
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    examples, skipped = read(tmp_path)
    assert [e.file for e in examples] == ["sub/a.jpg"]
    assert skipped == [{"file": ".DS_Store", "reason": "system file"}]


def test_class_data_limit(tmp_path):
    archive = make_zip(tmp_path / "c.zip", {f"{i}.jpg": image_bytes() for i in range(3)})
    examples, skipped = read_images(archive, "class_data", "a dog", 64, limit=2)
    assert [e.file for e in examples] == ["0.jpg", "1.jpg"]
    assert skipped == [{"file": "2.jpg", "reason": "beyond the 2 images asked for"}]


@pytest.mark.parametrize("members, message", [
    ({}, "the archive is empty"),
    ({"a.txt": b"x", "b.pdf": b"%PDF"}, r"no usable images among 2 files \(a.txt: not an image"),
])
def test_unusable_archives_refused(tmp_path, members, message):
    examples, skipped = read(make_zip(tmp_path / "a.zip", members))
    with pytest.raises(UserError, match=message):
        require_images(examples, skipped, "instance_data")


def test_neither_archive_nor_image_refused(tmp_path):
    path = tmp_path / "photos.zip"
    path.write_text("a note, not photos")
    with pytest.raises(UserError, match="photos.zip is not a ZIP or tar archive, nor an image"):
        read(path)


def test_missing_file_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read(tmp_path / "nope.zip")


def test_damaged_bomb_and_strip_images_skipped_with_reasons(tmp_path):
    bomb = io.BytesIO()
    Image.new("1", (14000, 14000)).save(bomb, format="PNG")  # 196 Mpx: over PIL's bomb limit
    members = {"a_good.jpg": image_bytes(), "b_damaged.jpg": image_bytes((0, 90, 200)),
               "c_bomb.png": bomb.getvalue(), "d_strip.png": image_bytes(size=(900, 10),
                                                                          fmt="PNG")}
    archive = make_zip(tmp_path / "a.zip", members)
    data = bytearray(archive.read_bytes())
    payload = members["b_damaged.jpg"]
    at = data.index(payload) + len(payload) // 2
    data[at] ^= 0xFF  # one flipped byte: the entry's CRC no longer matches
    archive.write_bytes(bytes(data))
    examples, skipped = read(archive)
    assert [e.file for e in examples] == ["a_good.jpg"]
    reasons = {s["file"]: s["reason"] for s in skipped}
    assert reasons["b_damaged.jpg"].startswith("unreadable (Bad CRC-32")
    assert reasons["c_bomb.png"].startswith("too many pixels")
    assert reasons["d_strip.png"] == "900x10 is too narrow (at most 8:1)"


def tar_bytes(members: dict, mode="w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(payload, tarfile.TarInfo):
                info = payload
            else:
                info.size = len(payload)
            tar.addfile(info, None if isinstance(payload, tarfile.TarInfo)
                        else io.BytesIO(payload))
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_archives_recognised_by_content(tmp_path, mode):
    path = tmp_path / "upload"  # no extension, as from a presigned URL
    path.write_bytes(tar_bytes({"dog/a.jpg": image_bytes(), "dog/b.png": image_bytes(fmt="PNG")},
                               mode))
    examples, skipped = read(path)
    assert [e.file for e in examples] == ["dog/a.jpg", "dog/b.png"] and skipped == []


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz"])
def test_an_empty_tar_is_an_empty_archive_and_zeros_are_no_archive(tmp_path, mode):
    """Told from the first header block: an empty tar is only its end marker; a file of zeros
    longer than that is no tar (tarfile.is_tarfile read all of it, and said it was one)."""
    from train.intake import looks_like_tar, require_images

    path = tmp_path / "upload"
    path.write_bytes(tar_bytes({}, mode))
    assert looks_like_tar(path)
    with pytest.raises(UserError, match="instance_data: the archive is empty"):
        require_images(*read(path), "instance_data")
    path.write_bytes(bytes(1 << 20))
    assert not looks_like_tar(path)


def test_a_single_image_is_an_archive_of_one(tmp_path):
    path = tmp_path / "upload"
    path.write_bytes(image_bytes(fmt="WEBP"))
    (example,), _ = read(path)
    assert example.file == "upload" and example.image.mode == "RGB"


def hostile_member(name, kind, target=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_hostile_tar_never_writes_or_follows(tmp_path):
    path = tmp_path / "evil.tar"
    path.write_bytes(tar_bytes({
        "../escape.jpg": image_bytes(), "/etc/abs.jpg": image_bytes(),
        "link.jpg": hostile_member("link.jpg", tarfile.SYMTYPE, "/etc/passwd"),
        "hard.jpg": hostile_member("hard.jpg", tarfile.LNKTYPE, "ok.jpg"),
        "dev": hostile_member("dev", tarfile.CHRTYPE), "ok.jpg": image_bytes()}))
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    examples, skipped = read(path)
    assert [e.file for e in examples] == ["ok.jpg"]
    reasons = {s["file"]: s["reason"] for s in skipped}
    assert reasons == {"../escape.jpg": "unsafe path", "/etc/abs.jpg": "unsafe path",
                       "link.jpg": "a link (links are never followed)",
                       "hard.jpg": "a link (links are never followed)",
                       "dev": "not a regular file"}
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar"]


def test_zip_bomb_refused_before_inflating(tmp_path):
    import zipfile

    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\0" * (50 << 20))  # 50 MiB of zeros: ~50 KiB deflated
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"bomb.zip expands \d+ times \(limit 200\)"):
        read(path)
    assert time.perf_counter() - start < 1
    with pytest.raises(UserError, match="would expand to 50 MiB, over the 10 MiB limit"):
        read_images(path, "instance_data", "c", 64, limits=Limits(max_bytes=10 << 20))


def test_too_many_files_refused(tmp_path):
    archive = make_zip(tmp_path / "many.zip", {f"{i}.txt": b"x" for i in range(30)})
    with pytest.raises(UserError, match="holds more than 20 files"):
        read_images(archive, "instance_data", "c", 64, limits=Limits(max_files=20))


def test_encrypted_entries_said_clearly(tmp_path):
    archive = make_zip(tmp_path / "locked.zip", {"a.jpg": image_bytes()})
    data = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set "encrypted"
        data[data.index(signature) + offset] |= 0x1
    archive.write_bytes(bytes(data))
    examples, skipped = read(archive)
    with pytest.raises(UserError, match="a.jpg: encrypted: send an archive without a password"):
        require_images(examples, skipped, "instance_data")


def test_pixel_limit_checked_from_the_header(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"big.png": image_bytes(size=(3000, 2000), fmt="PNG")})
    _, skipped = read_images(archive, "instance_data", "c", 64,
                             limits=Limits(max_pixels=5_000_000))
    assert skipped == [{"file": "big.png", "reason": "too many pixels (3000x2000, limit 5 Mpx)"}]


def encoded(image, fmt, **kw):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_every_image_format_and_mode(tmp_path):
    red = Image.new("RGB", (64, 64), (220, 20, 20))
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    gif_frames = [Image.new("RGB", (64, 64), c) for c in ("red", "lime", "blue")]
    sixteen = Image.fromarray(np.full((64, 64), 65535 // 2, dtype=np.uint16))
    members = {
        "a.jpg": encoded(red, "JPEG"), "b.png": encoded(red, "PNG"),
        "c.webp": encoded(red, "WEBP"), "d.bmp": encoded(red, "BMP"),
        "e.tiff": encoded(red, "TIFF"), "f.heic": encoded(red, "HEIF"),
        "g.avif": encoded(red, "AVIF"),
        "h_cmyk.jpg": encoded(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"),
        "i_16bit.png": encoded(sixteen, "PNG"),
        "j_palette_clear.png": encoded(palette, "PNG", transparency=0),
        "k_anim.gif": encoded(gif_frames[0], "GIF", save_all=True,
                              append_images=gif_frames[1:]),
        "l_gray.jpg": encoded(Image.new("L", (64, 64), 90), "JPEG"),
    }
    examples, skipped = read_images(make_zip(tmp_path / "a.zip", members), "instance_data",
                                    "c", 64, background="#00ff00")
    assert skipped == []
    by_name = {e.file: e for e in examples}
    assert len(by_name) == 12 and all(e.image.mode == "RGB" for e in examples)
    for name in ("a.jpg", "b.png", "c.webp", "d.bmp", "e.tiff", "f.heic", "g.avif",
                 "h_cmyk.jpg"):
        r, g, b = by_name[name].image.getpixel((32, 32))
        assert r > 180 and g < 80 and b < 80, (name, (r, g, b))
    assert abs(by_name["i_16bit.png"].image.getpixel((5, 5))[0] - 127) <= 1
    assert "high bit depth" in by_name["i_16bit.png"].notes[0]
    assert by_name["j_palette_clear.png"].image.getpixel((5, 5)) == (0, 255, 0)
    assert by_name["k_anim.gif"].notes == ["first frame of 3"]
    assert by_name["h_cmyk.jpg"].notes == ["converted from CMYK"]
    assert by_name["l_gray.jpg"].image.getpixel((5, 5))[0] == by_name["l_gray.jpg"] \
        .image.getpixel((5, 5))[2]


def test_truncated_image_skipped_and_small_one_warned(tmp_path):
    whole = image_bytes(size=(64, 64))
    archive = make_zip(tmp_path / "a.zip", {"cut.jpg": whole[: len(whole) // 2],
                                            "tiny.jpg": image_bytes(size=(20, 20))})
    examples, skipped = read(archive)
    assert skipped[0]["file"] == "cut.jpg" and skipped[0]["reason"].startswith("unreadable")
    assert examples[0].notes == ["small: 20x20 is under half the 64 px training resolution "
                                 "and will look soft"]
    assert examples[0].report()["notes"] == examples[0].notes


def test_big_jpeg_decoded_at_reduced_scale_keeps_its_reported_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    archive = make_zip(tmp_path / "a.zip",
                       {"big.jpg": image_bytes(size=(4000, 3000), exif=exif)})
    (example,), _ = read(archive, resolution=256)
    assert example.size == (3000, 4000)
    assert min(example.image.size) == 256 and example.image.size[1] > example.image.size[0]
    assert example.notes == ["rotated (EXIF orientation 6)"]


def test_captions_from_sidecars_and_file_names(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {
        "plain.jpg": image_bytes(),
        "beach.jpg": image_bytes(), "beach.txt": "  S   on the beach\n".encode(),
        "hat/img-1@a photo of S C wearing a hat.jpg": image_bytes(),
        "snow.png": image_bytes(fmt="PNG"), "snow.caption": b"a photo of S in the snow",
        "notes.txt": b"not beside any image",
    })
    examples, skipped = read_images(archive, "instance_data", "a photo of sks dog", 64,
                                    words=("sks", "dog"))
    captions = {e.file: e.caption for e in examples}
    assert captions == {"beach.jpg": "sks on the beach",
                        "hat/img-1@a photo of S C wearing a hat.jpg":
                            "a photo of sks dog wearing a hat",
                        "plain.jpg": "a photo of sks dog",
                        "snow.png": "a photo of sks in the snow"}
    assert skipped == [{"file": "notes.txt", "reason": "not an image"}]  # sidecars not listed


def test_prompt_words():
    from train.intake import prompt_words

    assert prompt_words("a photo of sks dog", "a photo of a dog") == ("sks", "dog")
    assert prompt_words("zwx man, portrait", "a photo of a man") == ("zwx", "man")
    assert prompt_words("a photo of zwx man", None) == ("zwx", "man")


def test_folder_captions_joepenna_style(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {
        "root.jpg": image_bytes(),
        "bingo/1.jpg": image_bytes(),
        "bingo/dog/2.jpg": image_bytes(),
        "effy/person/a picture of/3.jpg": image_bytes(),
        "bingo/dog/4@S being a good C.jpg": image_bytes(),
    })
    args = (archive, "instance_data", "a photo of sks cat", 64)
    examples, _ = read_images(*args, words=("sks", "cat"), folder_captions=True)
    assert {e.file: e.caption for e in examples} == {
        "root.jpg": "a photo of sks cat", "bingo/1.jpg": "bingo cat",
        "bingo/dog/2.jpg": "bingo dog", "effy/person/a picture of/3.jpg": "a picture of effy person",
        "bingo/dog/4@S being a good C.jpg": "bingo being a good dog"}
    plain, _ = read_images(*args, words=("sks", "cat"))  # off by default: folders are folders
    assert {e.caption for e in plain} == {"a photo of sks cat", "sks being a good cat"}


def test_caption_edge_cases_found_in_review(tmp_path):
    members = {"./x.jpg": image_bytes(), "./x.txt": b"S from a dot-slash tar",
               "y.JPG": image_bytes(), "y.TXT": b"upper case S",
               "bin\\1go/z@a photo of S.jpg": image_bytes()}
    path = tmp_path / "a.tar"
    path.write_bytes(tar_bytes(members))
    examples, skipped = read_images(path, "instance_data", "default", 64,
                                    words=("sks", "dog"), folder_captions=True)
    assert {e.file: e.caption for e in examples} == {
        "./x.jpg": "sks from a dot-slash tar", "y.JPG": "upper case sks",
        "bin\\1go/z@a photo of S.jpg": "a photo of bin\\1go"}
    assert skipped == []


def test_a_caption_file_too_large_to_be_a_caption_skips_its_image(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"a.jpg": image_bytes(), "a.txt": b"S " * (40 << 10),
                                            "b.jpg": image_bytes(), "b.txt": b"S " * (30 << 10)})
    examples, skipped = read(archive)
    assert [e.file for e in examples] == ["b.jpg"] and len(examples[0].caption) == (60 << 10) - 1
    assert skipped == [{"file": "a.jpg", "reason": "its caption file a.txt holds 81920 bytes; "
                                                   "a caption is at most 64 KiB of text"}]


def test_damaged_caption_file_keeps_the_default_caption(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"a.jpg": image_bytes(), "a.txt": b"my caption" * 50})
    data = bytearray(archive.read_bytes())
    data[data.index(b"my caption") + 5] ^= 0xFF
    archive.write_bytes(bytes(data))
    (example,), _ = read(archive)
    assert example.caption == "a photo of sks dog"


def test_a_single_bomb_image_is_skipped_not_a_traceback(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (14000, 14000)).save(path)
    examples, skipped = read(path)
    with pytest.raises(UserError, match="huge.png: too many pixels"):
        require_images(examples, skipped, "instance_data")


def test_folder_entries_count_toward_the_file_limit(tmp_path):
    members = {f"d{i}": hostile_member(f"d{i}", tarfile.DIRTYPE) for i in range(30)}
    path = tmp_path / "dirs.tar"
    path.write_bytes(tar_bytes(dict(members, **{"a.jpg": image_bytes()})))
    with pytest.raises(UserError, match="holds more than 20 files"):
        read_images(path, "instance_data", "c", 64, limits=Limits(max_files=20))


def test_compressed_tar_bombs_stop_at_the_limit(tmp_path):
    huge_name = tarfile.TarInfo("a" * (2 << 20) + ".jpg")  # a 2 MiB GNU long-name header
    huge_name.size = len(ONE := image_bytes())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(huge_name, io.BytesIO(ONE))
    path = tmp_path / "longname.tar.bz2"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="has a 2 MiB entry header; refused as a likely archive"):
        read(path)

    path = tmp_path / "zeros.tar.gz"
    path.write_bytes(tar_bytes({"zeros.bin": b"\0" * (3 << 20)}, "w:gz"))
    with pytest.raises(UserError, match="zeros.tar.gz expands past 1 MiB"):
        read_images(path, "instance_data", "c", 64, limits=Limits(max_bytes=1 << 20))


def test_compressed_tar_members_come_in_name_order(tmp_path):
    members = {f"{name}.jpg": image_bytes((i, 0, 0)) for i, name in enumerate("zyxwvu")}
    path = tmp_path / "photos.tar.xz"
    path.write_bytes(tar_bytes(members, "w:xz"))  # stored z..u, read u..z
    examples, _ = read(path)
    assert [e.file for e in examples] == ["u.jpg", "v.jpg", "w.jpg", "x.jpg", "y.jpg", "z.jpg"]


def test_heic_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # as an iPhone writes a portrait photo
    heic = encoded(Image.new("RGB", (80, 64), (200, 30, 30)), "HEIF", exif=exif.tobytes())
    (example,), _ = read(make_zip(tmp_path / "a.zip", {"IMG_1.HEIC": heic}))
    assert example.size == (64, 80) and example.image.size == (64, 80)
