"""Property tests of archive member names: whatever the names, intake never raises on them,
never writes a file, and keeps exactly the safe, visible images."""

import io
import os
import tarfile
import zipfile
from pathlib import PurePosixPath

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import image_bytes
from train.intake import read_images

PART = st.one_of(st.sampled_from(["..", ".", "", "__MACOSX", ".hidden", "a", "b.jpg", "C:",
                                  "con", "x\\..\\y", " "]),
                 st.text(min_size=1, max_size=12).filter(lambda t: "\x00" not in t))
NAME = st.lists(PART, min_size=1, max_size=5).map("/".join)
ONE_IMAGE = image_bytes(size=(16, 16))


def expected_kept(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return not (not parts or name.startswith("/") or ".." in parts or "__MACOSX" in parts
                or any(p.startswith(".") for p in parts)
                or parts[-1].lower() in {"thumbs.db", "desktop.ini", ".ds_store"})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAME, min_size=1, max_size=6, unique=True), as_tar=st.booleans())
def test_member_names_never_escape_and_never_crash(tmp_path, names, as_tar):
    names = [n for n in names if n.strip("/") and not n.endswith("/")]
    path = tmp_path / f"archive-{len(os.listdir(tmp_path))}"
    if as_tar:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = len(ONE_IMAGE)
                tar.addfile(info, io.BytesIO(ONE_IMAGE))
        path.write_bytes(buffer.getvalue())
    else:
        with zipfile.ZipFile(path, "w") as archive:
            for name in names:
                archive.writestr(name, ONE_IMAGE)
    before = set(os.listdir(tmp_path))
    examples, skipped = read_images(path, "instance_data", "c", 16)
    assert set(os.listdir(tmp_path)) == before  # nothing written, anywhere we can see
    stored = [e.file for e in examples] + [s["file"] for s in skipped]
    assert len(stored) == len(set(stored))  # every entry accounted for once
    for example in examples:
        assert expected_kept(example.file), example.file
