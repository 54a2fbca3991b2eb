"""core.data.ingest: zips read safely (names, counts, sizes, ratios), labels from folders, files
imported with rejections and duplicates reported. Every input is built here, in memory."""

from __future__ import annotations

import io
import os
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from core.data import images, ingest
from core.data.ingest import IngestError, ingest_files, ingest_folder, ingest_zip, iter_zip
from tests.test_images import bomb_png

UNSAFE = "unsafe path in zip (absolute or '..')"


def img(seed: int, fmt: str = "PNG", mode: str = "RGB", size=(12, 10)) -> bytes:
    """A distinct small image per seed (distinct pixels, so no accidental duplicates)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, fmt)
    return buf.getvalue()


def make_zip(members, method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def patch_entry(data: bytes, member: str, *, flags: int | None = None,
                size: int | None = None) -> bytes:
    """Rewrite a member's general-purpose flags and/or declared uncompressed size in both its
    local header and its central-directory entry (what a hostile zip writer would do)."""
    out = bytearray(data)
    name = member.encode()
    for sig, flag_at, size_at, name_at in ((b"PK\x03\x04", 6, 22, 30), (b"PK\x01\x02", 8, 24, 46)):
        at = out.find(sig)
        while at >= 0 and out[at + name_at: at + name_at + len(name)] != name:
            at = out.find(sig, at + 1)
        assert at >= 0, member
        if flags is not None:
            out[at + flag_at: at + flag_at + 2] = struct.pack("<H", flags)
        if size is not None:
            out[at + size_at: at + size_at + 4] = struct.pack("<I", size)
    return bytes(out)


def reasons(result) -> dict[str, str]:
    return {r.name: r.reason for r in result.rejected}


def test_class_folder_zip_gives_labels_and_counts():
    members = [(f"cats/c{i}.png", img(i)) for i in range(3)] + \
              [(f"dogs/d{i}.jpg", img(10 + i, "JPEG")) for i in range(2)]
    result = ingest_zip(make_zip(members), "pets.zip", image_size=16)
    assert result.pixels.shape == (5, 16, 16, 3) and result.pixels.dtype == np.uint8
    assert result.labels == ["cats"] * 3 + ["dogs"] * 2
    assert result.names == [m for m, _ in members]
    assert len(result.hashes) == 5 and len(set(result.hashes)) == 5
    assert result.labeled and not result.rejected and not result.duplicates


def test_wrapped_class_folders_use_the_second_level():
    members = [("pets/cats/a.png", img(1)), ("pets/cats/b.png", img(2)), ("pets/dogs/c.png", img(3))]
    assert ingest_zip(make_zip(members), "p.zip").labels == ["cats", "cats", "dogs"]
    # an image loose in the wrapper is outside the class folders, not a reason to make "pets" the only class
    loose = ingest_zip(make_zip(members + [("pets/readme-photo.png", img(4))]), "p.zip")
    assert loose.labels == ["cats", "cats", "dogs", None]
    # One class folder with files directly inside is a label, not a wrapper to strip.
    single = [("cats/a.png", img(1)), ("cats/b.png", img(2))]
    assert ingest_zip(make_zip(single), "c.zip").labels == ["cats", "cats"]


def test_root_images_are_unlabeled():
    result = ingest_zip(make_zip([("a.png", img(1)), ("b.png", img(2))]), "flat.zip")
    assert result.labels == [None, None] and not result.labeled
    mixed = ingest_zip(make_zip([("a.png", img(1)), ("cats/b.png", img(2))]), "mixed.zip")
    assert mixed.labels == [None, "cats"] and not mixed.labeled


def test_directories_macosx_and_dotfiles_are_skipped_silently():
    members = [("cats/", b""), ("cats/a.png", img(1)), ("__MACOSX/cats/._a.png", b"junk"),
               ("cats/.DS_Store", b"junk"), (".hidden/x.png", img(2))]
    result = ingest_zip(make_zip(members), "mac.zip")
    assert result.names == ["cats/a.png"] and result.rejected == []


def test_unsafe_member_names_are_rejected():
    members = [("../evil.png", img(1)), ("/abs.png", img(2)), ("C:/drive.png", img(3)),
               ("a\\..\\back.png", img(4)), ("ok/../../up.png", img(5)), ("good.png", img(6))]
    result = ingest_zip(make_zip(members), "evil.zip")
    assert result.names == ["good.png"]
    assert reasons(result) == {name: UNSAFE for name, _ in members[:5]}


def test_zip_bomb_ratio_is_refused_before_reading():
    zeros = bytes(4 * 2**20)
    result = ingest_zip(make_zip([("x.png", zeros), ("ok.png", img(1))]), "bomb.zip")
    assert result.names == ["ok.png"]
    reason = reasons(result)["x.png"]
    assert reason.startswith("compression ratio ") and reason.endswith(
        ":1 is over the 200:1 limit (zip bomb?)")
    assert int(reason.split()[2].split(":")[0]) > 200


def test_small_highly_compressible_image_is_not_a_bomb():
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), "white").save(buf, "BMP")
    data = make_zip([("white.bmp", buf.getvalue())])
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo("white.bmp")
    assert info.file_size / info.compress_size > ingest.MAX_RATIO  # yet it is a real image
    assert ingest_zip(data, "w.zip").names == ["white.bmp"]


def test_member_whose_declared_size_lies_is_rejected():
    data = make_zip([("liar.png", bytes(3 * 2**20)), ("ok.png", img(1))])
    data = patch_entry(data, "liar.png", size=1000)  # claims 1000 bytes, ratio looks harmless
    result = ingest_zip(data, "liar.zip")
    assert result.names == ["ok.png"]
    assert "damaged zip member" in reasons(result)["liar.png"]


def test_reading_stops_at_the_byte_cap(monkeypatch):
    # Whatever the header claims (here the pre-read check is switched off, as if it lied),
    # no more than MAX_FILE_BYTES + 1 bytes of a member are ever inflated.
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 64 * 2**10)
    monkeypatch.setattr(ingest, "_refuse_before_reading", lambda info, total: None)
    inflated = []
    real_read = zipfile.ZipExtFile.read

    def counting_read(self, n=-1):
        chunk = real_read(self, n)
        inflated.append(len(chunk))
        return chunk

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    big = np.random.default_rng(0).integers(0, 256, 2**20, dtype=np.uint8).tobytes()
    items = list(iter_zip(make_zip([("big.png", big)]), "z.zip"))
    assert items[0][1].reason.startswith("inflates past the 64 KB limit")
    assert sum(inflated) <= 64 * 2**10 + 1


def test_honest_oversized_member_is_refused_without_reading(monkeypatch):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 2**20)
    noise = np.random.default_rng(1).integers(0, 256, 2 * 2**20, dtype=np.uint8).tobytes()
    result = ingest_zip(make_zip([("huge.png", noise), ("ok.png", img(1))]), "h.zip")
    assert reasons(result) == {"huge.png": "file is 2.0 MB, over the 1 MB limit"}


def test_total_uncompressed_size_is_capped(monkeypatch):
    members = [(f"m{i}.png", img(i, size=(32, 32))) for i in range(4)]
    first = len(members[0][1])
    monkeypatch.setattr(ingest, "MAX_TOTAL_BYTES", first + 10)
    result = ingest_zip(make_zip(members, zipfile.ZIP_STORED), "t.zip")
    assert result.names == ["m0.png"]
    assert set(reasons(result)) == {"m1.png", "m2.png", "m3.png"}
    assert all("total uncompressed size" in r for r in reasons(result).values())


def test_encrypted_member_is_rejected():
    data = patch_entry(make_zip([("secret.png", img(1)), ("ok.png", img(2))]), "secret.png",
                       flags=0x1)
    result = ingest_zip(data, "enc.zip")
    assert result.names == ["ok.png"] and "encrypted" in reasons(result)["secret.png"]


@pytest.mark.parametrize("members", [[], [("empty/", b""), ("__MACOSX/._x", b"x")]])
def test_empty_zip(members):
    with pytest.raises(IngestError, match=r"^e\.zip: the zip holds no files$"):
        ingest_zip(make_zip(members), "e.zip")


def test_not_a_zip():
    with pytest.raises(IngestError, match="not a zip file"):
        ingest_zip(b"this is not a zip", "fake.zip")


def test_zip_over_the_member_cap(monkeypatch):
    monkeypatch.setattr(ingest, "MAX_MEMBERS", 3)
    with pytest.raises(IngestError, match="holds 5 files, over the limit of 3"):
        ingest_zip(make_zip([(f"{i}.png", img(i)) for i in range(5)]), "many.zip")
    # Far over: refused from the end record, before zipfile parses the directory.
    with pytest.raises(IngestError, match="directory lists 12 entries"):
        ingest_zip(make_zip([(f"{i}.png", b"x") for i in range(12)]), "more.zip")


def test_zip_from_a_path(tmp_path):
    path = tmp_path / "d.zip"
    path.write_bytes(make_zip([("a/x.png", img(1)), ("b/y.png", img(2))]))
    assert ingest_zip(path, "d.zip").labels == ["a", "b"]


def test_duplicates_are_stored_once():
    same = np.random.default_rng(5).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    as_png, as_bmp = io.BytesIO(), io.BytesIO()
    Image.fromarray(same).save(as_png, "PNG")
    Image.fromarray(same).save(as_bmp, "BMP")
    files = [("a.png", as_png.getvalue()), ("b.bmp", as_bmp.getvalue()),
             ("c.png", as_png.getvalue()), ("d.png", img(1))]
    result = ingest_files(files, image_size=8)
    assert result.names == ["a.png", "d.png"] and result.duplicates == ["b.bmp", "c.png"]
    assert len(result.pixels) == 2


def test_mix_of_good_and_bad_files():
    truncated = img(3, size=(64, 64))
    files = [("good.png", img(1)), ("good.webp", img(2, "WEBP")), ("notes.txt", b"hello"),
             ("cut.png", truncated[: len(truncated) // 2]),
             ("bomb.png", bomb_png(10000, 10000)),
             ("set.zip", make_zip([("cats/a.png", img(4)), ("../x.png", img(5))]))]
    result = ingest_files(files, image_size=8)
    assert result.names == ["good.png", "good.webp", "set.zip/cats/a.png"]
    assert result.labels == [None, None, "cats"]
    got = reasons(result)
    assert set(got) == {"notes.txt", "cut.png", "bomb.png", "set.zip/../x.png"}
    assert got["notes.txt"].startswith("not a recognised image")
    assert got["cut.png"] == "file is truncated or corrupt"
    assert "decompression bomb" in got["bomb.png"]
    assert got["set.zip/../x.png"] == UNSAFE


def test_a_bad_zip_among_files_is_one_rejection():
    result = ingest_files([("a.png", img(1)), ("empty.zip", make_zip([]))])
    assert result.names == ["a.png"]
    assert reasons(result) == {"empty.zip": "the zip holds no files"}


def test_nothing_usable_lists_the_reasons():
    with pytest.raises(IngestError) as info:
        ingest_files([("a.txt", b"nope"), ("b.png", b"\x89PNG broken")])
    message = str(info.value)
    assert "no usable image" in message and "a.txt: not a recognised image" in message
    assert "b.png:" in message


def test_channels_gray_only_or_mixed():
    gray = [("g1.png", img(1, mode="L")), ("g2.jpg", img(2, "JPEG", mode="L"))]
    assert ingest_files(gray, image_size=8).pixels.shape == (2, 8, 8, 1)
    mixed = ingest_files(gray + [("c.png", img(3))], image_size=8).pixels
    assert mixed.shape == (3, 8, 8, 3)
    assert (mixed[0, ..., 0] == mixed[0, ..., 1]).all() and (mixed[0, ..., 1] == mixed[0, ..., 2]).all()


def test_labels_given_with_files():
    result = ingest_files([("a.png", img(1)), ("b.png", img(2))], labels=["x", "y"])
    assert result.labels == ["x", "y"] and result.labeled
    with pytest.raises(ValueError):
        ingest_files([("a.png", img(1))], labels=["x", "y"])


def test_folder_labels_symlinks_and_hidden_files(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "puppies").mkdir(parents=True)
    (root / "cats" / "a.png").write_bytes(img(1))
    (root / "cats" / ".b.png").write_bytes(img(2))
    (root / "dogs" / "puppies" / "c.png").write_bytes(img(3))
    (root / "top.png").write_bytes(img(4))
    (root / "cats" / "huge.png").write_bytes(img(5, size=(200, 200)))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(img(6))
    os.symlink(outside / "secret.png", root / "cats" / "link.png")
    os.symlink(outside, root / "linked_dir")
    os.symlink(root / "cats" / "a.png", root / "dogs" / "inside.png")  # inside: allowed
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 60_000)
    result = ingest_folder(root, image_size=8)
    assert result.names == ["top.png", "cats/a.png", "dogs/puppies/c.png"]
    assert result.labels == [None, "cats", "dogs"]
    assert result.duplicates == ["dogs/inside.png"]  # same picture as cats/a.png
    got = reasons(result)
    assert got["cats/link.png"] == "symlink points outside the folder"
    assert got["cats/huge.png"].startswith("file is ") and "over the" in got["cats/huge.png"]
    assert not any("secret" in name for name in result.names + list(got))
