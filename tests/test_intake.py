"""Archive intake: the right images found, the rest skipped with a reason, clear errors."""

import io

import pytest
from PIL import Image

from conftest import image_bytes, make_zip
from train.config import UserError
from train.intake import read_images, require_images


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
    assert skipped == [{"file": ".DS_Store", "reason": "hidden file"}]


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


def test_not_a_zip_refused(tmp_path):
    path = tmp_path / "photos.zip"
    path.write_bytes(image_bytes())
    with pytest.raises(UserError, match="photos.zip is not a ZIP archive"):
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
    assert reasons["c_bomb.png"] == "too many pixels"
    assert reasons["d_strip.png"] == "900x10 is too narrow (at most 8:1)"
