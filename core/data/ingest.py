"""User files (loose images, zips, a folder) -> one uint8 array of square images, with reasons.

Inputs are untrusted. Zips are read member by member, never extracted: unsafe names, member
count, per-member size (``images.MAX_FILE_BYTES``), total inflated size and compression ratio are
all capped, and reading stops at the byte cap whatever the zip declares. Each image is decoded,
hashed and shrunk to (S, S, C) as it arrives, so the original bytes are never all held at once.
"""

from __future__ import annotations

import io
import lzma
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from core.data import images

MAX_MEMBERS = 20_000
MAX_TOTAL_BYTES = 2 * 2**30
MAX_RATIO = 200
# A member that inflates to less than this is never refused for its ratio alone: a plain white
# BMP legitimately compresses 1000:1, and a member this small cannot bomb anything.
RATIO_FLOOR_BYTES = 2**20
_CHUNK = 2**20
_UNSAFE = "unsafe path in zip (absolute or '..')"


@dataclass
class Rejection:
    """One input (file or zip member) that was not imported, and why, in words."""
    name: str
    reason: str


@dataclass
class IngestResult:
    """``pixels`` is uint8 (N, S, S, C), C = 1 when every image is grayscale, else 3.

    ``labels``, ``names`` and ``hashes`` have length N and follow ``pixels``; ``rejected`` lists
    the inputs refused; ``duplicates`` the names skipped because an identical image came first.
    """
    pixels: np.ndarray
    labels: list[str | None]
    names: list[str]
    hashes: list[str]
    rejected: list[Rejection] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        """True when every image has a label (a supervised run is possible)."""
        return bool(self.labels) and all(label is not None for label in self.labels)


class IngestError(Exception):
    """The whole input is unusable (not a zip, empty zip, too many members, no image at all)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _unsafe(info: zipfile.ZipInfo) -> bool:
    # zipfile only rewrites backslashes on Windows and truncates at NUL, so the raw name is
    # checked too: "..\\x", "C:x", "/x", "a\0../../x" are all refused, even though we never
    # write to disk, because the names become labels and paths elsewhere.
    return any("\\" in raw or "\0" in raw or raw.startswith("/") or raw[1:2] == ":"
               or ".." in raw.split("/") for raw in (info.filename, info.orig_filename))


def _skipped(member: str) -> bool:
    """Directories, macOS resource forks and hidden files are not inputs: skip them silently."""
    parts = member.split("/")
    return member.endswith("/") or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _directory_size(fp: BinaryIO) -> tuple[int, int] | None:
    """(entries, directory bytes) from the end-of-central-directory record, or None if unclear.

    Read before zipfile parses the directory, because zipfile builds a ZipInfo per entry up
    front: a crafted zip listing millions of entries would cost gigabytes before any cap applies.
    """
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    fp.seek(max(0, size - 22 - 65535))
    tail = fp.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    entries, cd_bytes = struct.unpack("<HI", tail[at + 10 : at + 16])
    if entries == 0xFFFF or cd_bytes == 0xFFFFFFFF:  # zip64: the locator points at the record
        loc = tail[max(at - 20, 0) : at]
        if loc[:4] != b"PK\x06\x07":
            return None
        fp.seek(struct.unpack("<Q", loc[8:16])[0])
        rec = fp.read(56)
        if rec[:4] != b"PK\x06\x06" or len(rec) < 56:
            return None
        entries, cd_bytes = struct.unpack("<QQ", rec[32:48])
    return entries, cd_bytes


def iter_zip(data_or_path: bytes | str | os.PathLike | BinaryIO,
             name: str) -> Iterator[tuple[str, bytes | Rejection]]:
    """Yield (member name, bytes or Rejection) for each file member of a zip, one at a time.

    Skips directories, ``__MACOSX/`` and dotfiles. Raises IngestError (when iterated) if the
    input is not a zip, holds no files, or has more than MAX_MEMBERS files.
    """
    if isinstance(data_or_path, (str, os.PathLike)):
        with open(data_or_path, "rb") as f:  # read from disk as needed, never loaded whole
            yield from iter_zip(f, name)
        return
    fp = data_or_path
    if isinstance(fp, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(fp)
    head = _directory_size(fp)
    if head and (head[0] > 3 * MAX_MEMBERS or head[1] > 3 * MAX_MEMBERS * 1024):
        # 3x: directories and __MACOSX twins are listed too, but do not count as files below.
        raise IngestError(name, f"the zip's directory lists {head[0]} entries, over the limit "
                          f"of {MAX_MEMBERS} files")
    fp.seek(0)
    try:
        zf = zipfile.ZipFile(fp)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        raise IngestError(name, "not a zip file (or a damaged one)") from None
    with zf:
        # Unsafe names are kept (even as "dirs") so they are reported, not silently dropped.
        infos = [i for i in zf.infolist()
                 if _unsafe(i) or not (i.is_dir() or _skipped(i.filename))]
        if not infos:
            raise IngestError(name, "the zip holds no files")
        if len(infos) > MAX_MEMBERS:
            raise IngestError(name, f"the zip holds {len(infos)} files, over the limit of "
                              f"{MAX_MEMBERS}")
        total = 0
        for info in infos:
            member = info.filename
            if _unsafe(info):
                yield member, Rejection(member, _UNSAFE)
                continue
            reason = _refuse_before_reading(info, total)
            if reason:
                yield member, Rejection(member, reason)
                continue
            n, data = _read_member(zf, info, MAX_TOTAL_BYTES - total)
            total += n  # actual bytes inflated, not the declared size
            yield member, data if isinstance(data, bytes) else Rejection(member, data)


def _over_total() -> str:
    limit = images.human_bytes(MAX_TOTAL_BYTES, True)
    return f"the zip's total uncompressed size is over the {limit} limit"


def _ratio_reason(ratio: float) -> str:
    return f"compression ratio {ratio:.0f}:1 is over the {MAX_RATIO}:1 limit (zip bomb?)"


def _refuse_before_reading(info: zipfile.ZipInfo, total: int) -> str | None:
    """A reason to refuse a member from its directory entry alone, or None."""
    if total >= MAX_TOTAL_BYTES:
        return _over_total()
    if info.flag_bits & 0x1:
        return "encrypted (password-protected) member"
    if info.file_size > RATIO_FLOOR_BYTES:
        ratio = info.file_size / info.compress_size if info.compress_size else float("inf")
        if ratio > MAX_RATIO:
            return _ratio_reason(ratio)
    return images.size_reason(info.file_size)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo,
                 budget: int) -> tuple[int, bytes | str]:
    """Read one member in chunks; returns (bytes inflated, data or the reason it was refused).

    Never reads more than MAX_FILE_BYTES + 1 bytes, whatever the header claims.
    """
    cap = images.MAX_FILE_BYTES
    chunks: list[bytes] = []
    n = 0
    try:
        with zf.open(info) as f:
            while chunk := f.read(min(_CHUNK, cap + 1 - n)):
                n += len(chunk)
                if n > cap:
                    return n, (f"inflates past the {images.human_bytes(cap, True)} limit "
                               f"(declared {images.human_bytes(info.file_size)})")
                if n > budget:
                    return n, _over_total()
                if n > RATIO_FLOOR_BYTES and n > MAX_RATIO * max(info.compress_size, 1):
                    return n, _ratio_reason(n / max(info.compress_size, 1))
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, RuntimeError,
            NotImplementedError, ValueError, struct.error) as exc:
        # Bad CRC, a lying size, an unknown method: this member is lost, the others are not.
        return n, f"damaged zip member or unsupported compression ({type(exc).__name__})"
    return n, b"".join(chunks)


def zip_labels(members: list[str]) -> list[str | None]:
    """Labels from member paths: the top-level folder (or the second level when one wrapper
    folder holds everything and class folders sit below it); files outside the class folders
    (at the root, or loose in the wrapper) get None, which the import refuses with their name
    rather than making the wrapper one class of everything."""
    parts = [m.split("/") for m in members]
    if parts and len({p[0] for p in parts}) == 1 and any(len(p) >= 3 for p in parts):
        parts = [p[1:] for p in parts]
    return [p[0] if len(p) >= 2 else None for p in parts]


class _Collector:
    """Decodes, de-duplicates and shrinks images as they arrive; builds the IngestResult."""

    def __init__(self, image_size: int):
        if image_size < 1:
            raise ValueError("image_size must be positive")
        self.size, self.seen = image_size, set()
        self.pixels: list[np.ndarray] = []  # each (S, S, 1) or (S, S, 3)
        self.labels: list[str | None] = []
        self.names, self.hashes, self.duplicates = [], [], []
        self.rejected: list[Rejection] = []

    def add(self, name: str, data: bytes, label: str | None) -> bool:
        """Import one file; returns True when it was appended (not rejected, not a duplicate)."""
        try:
            px = images.decode_image(data, name)
        except images.ImageRejected as exc:
            self.rejected.append(Rejection(name, exc.reason))
            return False
        digest = images.content_hash(px)
        if digest in self.seen:
            self.duplicates.append(name)
            return False
        self.seen.add(digest)
        self.pixels.append(images.fit_square(px, self.size))
        self.labels.append(label)
        self.names.append(name)
        self.hashes.append(digest)
        return True

    def add_zip(self, src, name: str, prefix: str, fallback: str | None) -> None:
        """Import a zip's members; labels come from its folders once all members are seen."""
        members: list[str] = []
        start = len(self.labels)
        for member, item in iter_zip(src, name):
            if isinstance(item, Rejection):
                self.rejected.append(Rejection(prefix + member, item.reason))
            elif self.add(prefix + member, item, fallback):
                members.append(member)
        for i, label in enumerate(zip_labels(members)):
            self.labels[start + i] = label if label is not None else fallback

    def result(self, source: str) -> IngestResult:
        if not self.pixels:
            reasons = [f"{r.name}: {r.reason}" for r in self.rejected[:10]]
            if len(self.rejected) > 10:
                reasons.append(f"and {len(self.rejected) - 10} more")
            detail = f" ({'; '.join(reasons)})" if reasons else ""
            raise IngestError(source, "no usable image" + detail)
        channels = 1 if all(p.shape[2] == 1 for p in self.pixels) else 3
        out = np.empty((len(self.pixels), self.size, self.size, channels), np.uint8)
        for i, p in enumerate(self.pixels):
            out[i] = p  # broadcasting repeats a gray (S, S, 1) image into 3 channels
        return IngestResult(out, self.labels, self.names, self.hashes, self.rejected,
                            self.duplicates)


def _looks_like_zip(name: str, data: bytes) -> bool:
    return name.lower().endswith(".zip") or data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def ingest_files(files: Iterable[tuple[str, bytes]], image_size: int = 64,
                 labels: list[str | None] | None = None) -> IngestResult:
    """Import (name, bytes) pairs; a zip among them is expanded (labels from its folders).

    ``labels`` (optional) follows ``files``; for a zip it labels members outside class folders.
    Zip members are named ``"<zip name>/<member>"``. Raises IngestError if nothing is usable.
    """
    col = _Collector(image_size)
    count = 0
    for count, (name, data) in enumerate(files, start=1):
        if labels is not None and count > len(labels):
            raise ValueError("labels is shorter than files")
        label = labels[count - 1] if labels is not None else None
        if _looks_like_zip(name, data):
            try:
                col.add_zip(data, name, f"{name}/", label)
            except IngestError as exc:  # one bad zip must not cost the other files
                col.rejected.append(Rejection(name, exc.reason))
        else:
            col.add(name, data, label)
        del data  # only the shrunk pixels are kept
    if labels is not None and count != len(labels):
        raise ValueError(f"labels has {len(labels)} entries for {count} files")
    return col.result("the uploaded files" if count != 1 else name)


def ingest_zip(path_or_bytes: bytes | str | os.PathLike | BinaryIO, name: str,
               image_size: int = 64) -> IngestResult:
    """Import one zip (bytes, a path or an open binary file); members keep their zip paths."""
    col = _Collector(image_size)
    col.add_zip(path_or_bytes, name, "", None)
    return col.result(name)


def ingest_folder(path: str | os.PathLike, image_size: int = 64) -> IngestResult:
    """Import a directory tree; the first-level subfolder is the label (files at the top: None).

    Symlinked folders are not descended, and a file symlink that resolves outside ``path`` is
    refused, so a folder cannot smuggle in /etc or another user's files.
    """
    root = Path(path)
    if not root.is_dir():
        raise IngestError(str(path), "not a folder")
    real_root = root.resolve()
    col = _Collector(image_size)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for fn in sorted(filenames):
            rel = (Path(dirpath) / fn).relative_to(root).as_posix()
            if not _skipped(rel):
                data = _read_folder_file(root / rel, real_root)
                if isinstance(data, str):
                    col.rejected.append(Rejection(rel, data))
                else:
                    col.add(rel, data, rel.split("/")[0] if "/" in rel else None)
                del data  # only the shrunk pixels are kept
    return col.result(str(path))


def _read_folder_file(p: Path, real_root: Path) -> bytes | str:
    """The file's bytes, or the reason it is refused (outside link, not a file, too big)."""
    try:
        real = p.resolve(strict=True)
        if not real.is_relative_to(real_root):
            return "symlink points outside the folder"
        if not real.is_file():
            return "not a regular file"
        reason = images.size_reason(real.stat().st_size)
        if reason:
            return reason
        with open(real, "rb") as f:  # capped read: the file may have grown since stat()
            return f.read(images.MAX_FILE_BYTES + 1)
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
