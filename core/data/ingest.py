"""User files (loose images, zips, a folder) -> one uint8 array of square images, with reasons.

Inputs are untrusted. Zips are read member by member, never extracted: unsafe names, member
count, per-member size (``images.MAX_FILE_BYTES``), total inflated size and compression ratio are
all capped, and reading stops at the byte cap whatever the zip declares. Each image is decoded,
hashed and shrunk to (S, S, C) as it arrives, so the original bytes are never all held at once.

An import streams (stream_folder, stream_zip, stream_files): the shrunk pixels, digests, labels and
names are appended to files in a folder a chunk at a time (StreamedIngest), so memory holds a chunk
and 16 bytes per image for the duplicates, whatever the number of images; past PARALLEL_AFTER images
a pool of processes (the process's cores) decodes, results kept in order. A zip listing more than
ZIPFILE_MOST entries is read an entry of its directory at a time. ingest_folder, ingest_zip and
ingest_files give the same result in memory, for small inputs.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import stat
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from core.data import images

MAX_MEMBERS = 2_000_000
# A zip listing more entries than this is read by _iter_large_zip, one central-directory entry at a
# time: zipfile.ZipFile builds a ZipInfo per entry up front (half a kilobyte each: 500 MB for a
# million), so memory would grow with the zip. Smaller zips go through zipfile itself.
ZIPFILE_MOST = 20_000
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
    if head and (head[0] > ZIPFILE_MOST or head[1] > ZIPFILE_MOST * 256):
        yield from _iter_large_zip(fp, name)
        return
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
        yield from _read_members(infos, zf.open)


_DAMAGED = (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError)


def _iter_large_zip(fp: BinaryIO, name: str) -> Iterator[tuple[str, bytes | Rejection]]:
    """iter_zip for a zip listing more than ZIPFILE_MOST entries: its central directory is read
    twice, an entry at a time (zipfile's own parsing of each record, never all the records at
    once): first to count the files against MAX_MEMBERS before any member is read, then to read
    them. The same checks, refusals and sentences as iter_zip."""
    try:
        where = _directory_place(fp)
        count = sum(1 for info in _central_entries(fp, *where)
                    if _unsafe(info) or not (info.is_dir() or _skipped(info.filename)))
    except _DAMAGED:
        raise IngestError(name, "not a zip file (or a damaged one)") from None
    if not count:
        raise IngestError(name, "the zip holds no files")
    if count > MAX_MEMBERS:
        raise IngestError(name, f"the zip holds {count} files, over the limit of {MAX_MEMBERS}")
    files = (info for info in _central_entries(fp, *where)
             if _unsafe(info) or not (info.is_dir() or _skipped(info.filename)))
    yield from _read_members(files, lambda entry: _open_member(fp, entry))


def _read_members(infos: Iterable[zipfile.ZipInfo], open_member) -> Iterator[tuple[str, bytes | Rejection]]:
    """(member name, bytes or Rejection) of each listed file member, read through open_member
    (zipfile's, or the large-zip reader's): unsafe names and members refused before reading are
    reported, and the bytes actually inflated (not the declared sizes) count against MAX_TOTAL_BYTES."""
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
        n, data = _read_member(open_member, info, MAX_TOTAL_BYTES - total)
        total += n  # actual bytes inflated, not the declared size
        yield member, data if isinstance(data, bytes) else Rejection(member, data)


def _directory_place(fp: BinaryIO) -> tuple[int, int, int]:
    """(where the central directory starts, its bytes, the shift of every offset: data before the
    zip, as in a self-extracting one), as zipfile.ZipFile._RealGetContents finds them."""
    endrec = zipfile._EndRecData(fp)
    if not endrec:
        raise zipfile.BadZipFile("File is not a zip file")
    size_cd, offset_cd = endrec[zipfile._ECD_SIZE], endrec[zipfile._ECD_OFFSET]
    concat = endrec[zipfile._ECD_LOCATION] - size_cd - offset_cd
    if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
        concat -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    if concat < 0 or offset_cd < 0:
        raise zipfile.BadZipFile("Bad offset for central directory")
    return offset_cd + concat, size_cd, concat


def _central_entries(fp: BinaryIO, start: int, size: int, concat: int) -> Iterator[zipfile.ZipInfo]:
    """The central directory's entries as ZipInfo, one at a time, read a chunk at a time (the file
    position is set before each read: members are read from the same file between entries).
    The fields are those zipfile.ZipFile._RealGetContents sets."""
    header = struct.Struct(zipfile.structCentralDir)
    buffer, at, read_to, end = b"", 0, start, start + size
    while True:
        if len(buffer) - at < header.size:
            if read_to >= end:
                if len(buffer) - at:
                    raise zipfile.BadZipFile("Truncated central directory")
                return
            fp.seek(read_to)
            more = fp.read(min(_CHUNK, end - read_to))
            if not more:
                raise zipfile.BadZipFile("Truncated central directory")
            buffer, at, read_to = buffer[at:] + more, 0, read_to + len(more)
            continue
        centdir = header.unpack_from(buffer, at)
        if centdir[zipfile._CD_SIGNATURE] != zipfile.stringCentralDir:
            raise zipfile.BadZipFile("Bad magic number for central directory")
        record = header.size + sum(centdir[zipfile._CD_FILENAME_LENGTH:zipfile._CD_COMMENT_LENGTH + 1])
        while len(buffer) - at < record:
            if read_to >= end:
                raise zipfile.BadZipFile("Truncated central directory")
            fp.seek(read_to)
            more = fp.read(min(_CHUNK, end - read_to))
            if not more:
                raise zipfile.BadZipFile("Truncated central directory")
            buffer, at, read_to = buffer[at:] + more, 0, read_to + len(more)
        pos = at + header.size
        raw = buffer[pos:pos + centdir[zipfile._CD_FILENAME_LENGTH]]
        pos += len(raw)
        flags = centdir[zipfile._CD_FLAG_BITS]
        info = zipfile.ZipInfo(raw.decode("utf-8") if flags & 0x800 else raw.decode("cp437"))
        info.extra = buffer[pos:pos + centdir[zipfile._CD_EXTRA_FIELD_LENGTH]]
        pos += len(info.extra)
        info.comment = buffer[pos:pos + centdir[zipfile._CD_COMMENT_LENGTH]]
        at += record
        info.header_offset = centdir[zipfile._CD_LOCAL_HEADER_OFFSET]
        (info.create_version, info.create_system, info.extract_version, info.reserved, info.flag_bits,
         info.compress_type, t, d, info.CRC, info.compress_size, info.file_size) = centdir[1:12]
        if info.extract_version > zipfile.MAX_EXTRACT_VERSION:
            raise NotImplementedError(f"zip file version {info.extract_version / 10:.1f}")
        info.volume, info.internal_attr, info.external_attr = centdir[15:18]
        info._raw_time = t
        info.date_time = ((d >> 9) + 1980, (d >> 5) & 0xF, d & 0x1F, t >> 11, (t >> 5) & 0x3F, (t & 0x1F) * 2)
        info._decodeExtra()
        info.header_offset += concat
        yield info


def _open_member(fp: BinaryIO, info: zipfile.ZipInfo) -> zipfile.ZipExtFile:
    """A member's data to read, as zipfile.ZipFile.open checks it: the local header's magic and
    name must match the directory's; patched and strongly encrypted data are refused."""
    fp.seek(info.header_offset)
    raw = fp.read(zipfile.sizeFileHeader)
    if len(raw) != zipfile.sizeFileHeader:
        raise zipfile.BadZipFile("Truncated file header")
    fheader = struct.unpack(zipfile.structFileHeader, raw)
    if fheader[zipfile._FH_SIGNATURE] != zipfile.stringFileHeader:
        raise zipfile.BadZipFile("Bad magic number for file header")
    fname = fp.read(fheader[zipfile._FH_FILENAME_LENGTH])
    if fheader[zipfile._FH_EXTRA_FIELD_LENGTH]:
        fp.read(fheader[zipfile._FH_EXTRA_FIELD_LENGTH])
    if info.flag_bits & 0x20:
        raise NotImplementedError("compressed patched data (flag bit 5)")
    if info.flag_bits & 0x40:
        raise NotImplementedError("strong encryption (flag bit 6)")
    decoded = fname.decode("utf-8") if fheader[zipfile._FH_GENERAL_PURPOSE_FLAG_BITS] & 0x800 else fname.decode("cp437")
    if decoded != info.orig_filename:
        raise zipfile.BadZipFile(f"File name in directory {info.orig_filename!r} and header {fname!r} differ.")
    return zipfile.ZipExtFile(fp, "r", info, None, False)


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


def _read_member(open_member, info: zipfile.ZipInfo,
                 budget: int) -> tuple[int, bytes | str]:
    """Read one member in chunks; returns (bytes inflated, data or the reason it was refused).

    Never reads more than MAX_FILE_BYTES + 1 bytes, whatever the header claims.
    """
    cap = images.MAX_FILE_BYTES
    chunks: list[bytes] = []
    n = 0
    try:
        with open_member(info) as f:
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


# ---------------------------------------------------------------- streaming to disk

LISTED = 10_000  # rejected and duplicate names kept for the report; beyond, only counted
HEADER_BYTES = 128  # a fixed .npy header, written last, once the number of rows is known
CHUNK_BYTES = 4 * 2**20  # rows are buffered this much, then written: memory does not grow with N


def npy_header(shape: tuple[int, ...], dtype) -> bytes:
    """A version 1.0 .npy header of exactly HEADER_BYTES for an array of `shape` and `dtype`
    (np.load and np.lib.format.open_memmap read it; the spaces are the format's padding)."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                                    tuple(int(d) for d in shape))
    body = text.encode("latin1")
    if 10 + len(body) + 1 > HEADER_BYTES:
        raise ValueError(f"array shape {shape} is too large for a {HEADER_BYTES}-byte header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", HEADER_BYTES - 10) + body + b" " * (HEADER_BYTES - 11 - len(body)) + b"\n"


class _Rows:
    """Fixed-shape rows appended to a .npy file in chunks: at most CHUNK_BYTES of them in memory.
    ``close`` writes the header (the row count is known only then); ``get`` reads one row back."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.buffer = np.empty((max(1, CHUNK_BYTES // max(self.row_bytes, 1)), *self.shape), self.dtype)
        self.filled = self.n = 0
        self.handle = open(self.path, "wb")
        self.handle.write(b"\0" * HEADER_BYTES)

    def append(self, row) -> None:
        self.buffer[self.filled] = row  # broadcasting repeats a gray (S, S, 1) row into 3 channels
        self.filled += 1
        self.n += 1
        if self.filled == len(self.buffer):
            self.flush()

    def flush(self) -> None:
        if self.filled:
            self.handle.write(memoryview(self.buffer[:self.filled]).cast("B"))
            self.filled = 0

    def get(self, i: int) -> np.ndarray:
        written = self.n - self.filled
        if i >= written:
            return self.buffer[i - written].copy()
        raw = os.pread(self.handle.fileno(), self.row_bytes, HEADER_BYTES + i * self.row_bytes)
        return np.frombuffer(raw, self.dtype).reshape(self.shape)

    def close(self) -> Path:
        if not self.handle.closed:
            self.flush()
            self.handle.seek(0)
            self.handle.write(npy_header((self.n, *self.shape), self.dtype))
            self.handle.close()
        return self.path

    def widened(self, shape: tuple[int, ...]) -> "_Rows":
        """These rows copied, chunk by chunk, into rows of a wider `shape` (gray (S, S, 1) to
        colour (S, S, 3) when the first colour image arrives); this file is removed."""
        self.close()
        wider = _Rows(self.path.with_name(self.path.name + ".wide"), shape, self.dtype)
        old = np.load(self.path, mmap_mode="r")
        step = len(wider.buffer)
        for start in range(0, len(old), step):
            block = np.broadcast_to(old[start:start + step], (len(old[start:start + step]), *shape))
            wider.handle.write(np.ascontiguousarray(block).data)
            wider.n += len(block)
        del old
        os.replace(wider.path, self.path)
        wider.path = self.path
        return wider

    def discard(self) -> None:
        if not self.handle.closed:
            self.handle.close()


class _SeenDigests:
    """The sha256 digests met so far, for duplicates: an open-addressing table of each digest's
    first 8 bytes (16 bytes per image, not a set of Python strings), every match confirmed
    against the full digest by its row (``lookup(row)``)."""

    def __init__(self):
        self.keys = np.zeros(1024, np.uint64)
        self.rows = np.zeros(1024, np.int64)
        self.count = 0

    def find(self, digest: bytes, lookup) -> int | None:
        """The row of an equal digest already added, or None."""
        key = int.from_bytes(digest[:8], "little") or 1
        mask = len(self.keys) - 1
        slot = key & mask
        while True:
            here = int(self.keys[slot])
            if here == 0:
                return None
            if here == key and bytes(lookup(int(self.rows[slot]))) == digest:
                return int(self.rows[slot])
            slot = (slot + 1) & mask

    def add(self, digest: bytes, row: int) -> None:
        if 2 * (self.count + 1) > len(self.keys):
            keys, rows = self.keys[self.keys != 0], self.rows[self.keys != 0]
            self.keys = np.zeros(2 * len(self.keys), np.uint64)
            self.rows = np.zeros(len(self.keys), np.int64)
            for start in range(0, len(keys), 1 << 16):  # a slice at a time: no list of a million ints
                for key, at in zip(keys[start:start + (1 << 16)].tolist(), rows[start:start + (1 << 16)].tolist()):
                    self._put(key, at)
        self._put(int.from_bytes(digest[:8], "little") or 1, row)
        self.count += 1

    def _put(self, key: int, row: int) -> None:
        mask = len(self.keys) - 1
        slot = key & mask
        while self.keys[slot] != 0:
            slot = (slot + 1) & mask
        self.keys[slot] = key
        self.rows[slot] = row


def decode_fitted(data: bytes, name: str, size: int) -> tuple[np.ndarray, bytes] | str:
    """One image's bytes → (its (size, size, C) pixels, the sha256 digest of the decoded
    original), or the reason it is refused."""
    try:
        px = images.decode_image(data, name)
    except images.ImageRejected as exc:
        return exc.reason
    return images.fit_square(px, size), images.content_digest(px)


PARALLEL_AFTER = 2_000  # images decoded in this process before a pool of decoding processes starts
CHUNK_IMAGES = 256  # images per task sent to a decoding process
CHUNK_TASK_BYTES = 8 * 2**20  # ... or fewer, so that the bytes in flight stay bounded


def _decode_item(name: str, data: bytes | str | tuple[str], size: int) -> tuple[np.ndarray, bytes] | str:
    """decode_fitted of bytes; (path,) is a folder's plain file, read first (_read_plain); a str is
    the reason the file was refused already."""
    if isinstance(data, tuple):
        data = _read_plain(data[0])
    return data if isinstance(data, str) else decode_fitted(data, name, size)


def _decode_chunk(size: int, items: list[tuple[str, bytes | str | tuple[str]]]) -> list[tuple[np.ndarray, bytes] | str]:
    """_decode_item for each (name, data) of a task sent to a decoding process."""
    return [_decode_item(name, data, size) for name, data in items]


def _read_capped(handle: BinaryIO, size: int) -> bytes:
    """The file's bytes, at most MAX_FILE_BYTES + 1 (it may have grown since its size was read).
    Asked for its size + 1 first: read(20 MB) of a 500-byte file allocates 20 MB before it
    shrinks the result, which was half the cost of reading a small image."""
    cap = images.MAX_FILE_BYTES + 1
    data = handle.read(min(size + 1, cap))
    if len(data) == size + 1 and len(data) < cap:  # it grew: read on, to the cap
        data += handle.read(cap - len(data))
    return data


def _read_plain(path: str) -> bytes | str:
    """A file the folder's listing showed as a plain file (not a link): its bytes, or the reason it
    is refused. Opened without following a link and without blocking, so a link or a pipe put in
    its place since the listing is refused, not followed or waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
    try:
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                return "not a regular file"
            return images.size_reason(info.st_size) or _read_capped(handle, info.st_size)
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"


def decoding_processes() -> int:
    """How many processes decode a large import: EMBEDDING_LAB_THREADS when set, else the cores of
    this process's affinity mask (core.threads). 1: decode here, no pool."""
    from core import threads

    if os.environ.get(threads.ENV, "").strip():
        return threads.thread_share()  # the override, checked there
    return threads.affinity_cores()


class _Decoder:
    """Decodes images in the order they are given and hands each result, in that order, to
    `sink(name, decoded, meta)`. The first PARALLEL_AFTER are decoded here (a small import starts
    no process); past that, when decoding_processes() > 1, chunks go to a pool of that many
    processes, at most two chunks per process in flight, so memory stays bounded whatever N is."""

    def __init__(self, size: int, sink):
        self.size, self.sink = size, sink
        self.pool = None
        self.workers = 0
        self.count = 0
        self.chunk: list[tuple[str, bytes | str]] = []
        self.metas: list = []
        self.chunk_bytes = 0
        self.flight: list = []  # (future, names, metas), oldest first

    def put(self, name: str, data: bytes | str | tuple[str], meta) -> None:
        """data: the file's bytes, a folder's plain file to read (in the decoding process, so reading
        is shared out too), or the reason it was refused before decoding."""
        self.count += 1
        if self.pool is None and not self.flight and (self.count <= PARALLEL_AFTER or not self._start()):
            self.sink(name, _decode_item(name, data, self.size), meta)
            return
        self.chunk.append((name, data))
        self.metas.append(meta)
        self.chunk_bytes += 0 if isinstance(data, tuple) else len(data)
        if len(self.chunk) >= CHUNK_IMAGES or self.chunk_bytes >= CHUNK_TASK_BYTES:
            self._submit()

    def _start(self) -> bool:
        if self.workers == 0:
            self.workers = max(1, decoding_processes())
        if self.workers < 2:
            return False
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the app server has threads, and a forked child may inherit a held lock
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return True

    def _submit(self) -> None:
        if not self.chunk:
            return
        items, metas = self.chunk, self.metas
        self.chunk, self.metas, self.chunk_bytes = [], [], 0
        if self.pool is None:  # the pool broke: decode here, after what it had in flight
            while self.flight:
                self._collect()
            for (name, data), meta in zip(items, metas):
                self.sink(name, _decode_item(name, data, self.size), meta)
            return
        self.flight.append((self.pool.submit(_decode_chunk, self.size, items), items, metas))
        while len(self.flight) > 2 * self.workers:
            self._collect()

    def _collect(self) -> None:
        from concurrent.futures import CancelledError
        from concurrent.futures.process import BrokenProcessPool

        future, items, metas = self.flight.pop(0)
        try:
            results = future.result()
        except (BrokenProcessPool, CancelledError):
            # a decoding process died (killed for memory, or a script without a __main__ guard that
            # spawn re-ran): nothing is lost, the rest is decoded here
            self.close()
            results = [_decode_item(name, data, self.size) for name, data in items]
        for (name, _), decoded, meta in zip(items, results, metas):
            self.sink(name, decoded, meta)

    def drain(self) -> None:
        """Every image given so far decoded and handed on; the pool stopped."""
        self._submit()
        while self.flight:
            self._collect()
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            self.workers = 1  # not started again


@dataclass
class StreamedIngest:
    """An import streamed to files in ``folder``: pixels.npy (N, S, S, C) uint8, labels.npy (N,)
    int64 class indices (-1: no class folder), hashes.npy (N, 32) sha256 digests, names.jsonl one
    JSON string a line. ``rejected`` and ``duplicates`` keep the first LISTED names; the counts
    are whole."""
    folder: Path
    n: int
    image_size: int
    channels: int
    classes: list[str]
    rejected: list[Rejection]
    duplicates: list[str]
    n_rejected: int
    n_duplicates: int

    WORK_FILES = ("labels.npy", "hashes.npy", "names.jsonl")

    @property
    def pixels(self) -> np.ndarray:
        return np.load(self.folder / "pixels.npy", mmap_mode="r")

    @property
    def labels(self) -> np.ndarray:
        return np.load(self.folder / "labels.npy", mmap_mode="r")

    @property
    def hashes(self) -> np.ndarray:
        return np.load(self.folder / "hashes.npy", mmap_mode="r")

    def iter_names(self) -> Iterator[str]:
        with open(self.folder / "names.jsonl", encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)

    def loose_and_placed(self) -> tuple[str | None, tuple[str, str] | None]:
        """The first image outside a class folder, and the first one in one with its class (each
        None when there is none): what core.data.importing.check_class_folders names."""
        labels = self.labels
        loose_at = placed_at = None
        step = 1 << 16
        for start in range(0, self.n, step):
            block = np.asarray(labels[start:start + step])
            if loose_at is None and (block < 0).any():
                loose_at = start + int(np.argmax(block < 0))
            if placed_at is None and (block >= 0).any():
                placed_at = start + int(np.argmax(block >= 0))
            if loose_at is not None and placed_at is not None:
                break
        loose = placed = None
        for i, name in enumerate(self.iter_names()):
            if i == loose_at:
                loose = name
            if i == placed_at:
                placed = (name, self.classes[int(labels[i])])
            if (loose_at is None or loose is not None) and (placed_at is None or placed is not None):
                break
        return loose, placed

    def drop_work_files(self) -> None:
        """Leave only pixels.npy in the folder (what a dataset's folder holds)."""
        for name in self.WORK_FILES:
            (self.folder / name).unlink(missing_ok=True)

    def to_result(self) -> IngestResult:
        """The whole import in memory, as IngestResult (small inputs and tests)."""
        labels = np.asarray(self.labels)
        return IngestResult(np.array(self.pixels), [self.classes[i] if i >= 0 else None for i in labels.tolist()],
                            list(self.iter_names()), [bytes(h).hex() for h in np.asarray(self.hashes)],
                            list(self.rejected), list(self.duplicates))


class _Collector:
    """Decodes, de-duplicates and shrinks images as they arrive, appending them to files in
    ``folder`` (pixels, digests, labels, names) a chunk at a time: memory holds one chunk of each
    and 16 bytes per image for the duplicates, never the images. ``finish`` gives StreamedIngest.

    Labels: an image's label is decided as it arrives, except for a zip's members, whose class
    folders are known only once all its members are seen (a single wrapper folder holding the
    class folders is skipped, zip_labels): each member keeps both candidates and its zip (a
    group) until ``finish``."""

    def __init__(self, image_size: int, folder: str | os.PathLike):
        if image_size < 1:
            raise ValueError("image_size must be positive")
        self.size, self.folder = image_size, Path(folder)
        self.pixels: _Rows | None = None  # opened at the first image, when its channels are known
        self.hashes = _Rows(self.folder / "hashes.npy", (32,), np.uint8)
        self.label_rows = _Rows(self.folder / "labels.work", (3,), np.int32)  # (top folder, second folder, group)
        self.names = open(self.folder / "names.jsonl", "w", encoding="utf-8")
        self.seen = _SeenDigests()
        self.pool: dict[str, int] = {}  # label text → id
        self.groups: list[list] = []  # per zip: [first folder, one first folder?, any deeper?, fallback id]
        self.rejected: list[Rejection] = []
        self.duplicates: list[str] = []
        self.n_rejected = self.n_duplicates = 0
        self.decoder = _Decoder(image_size, self._decoded)

    @property
    def n(self) -> int:
        return self.hashes.n

    def reject(self, name: str, reason: str) -> None:
        self.n_rejected += 1
        if len(self.rejected) < LISTED:
            self.rejected.append(Rejection(name, reason))

    def _label_id(self, label: str | None) -> int:
        if label is None:
            return -1
        return self.pool.setdefault(label, len(self.pool))

    def add(self, name: str, data: bytes | str | tuple[str], label: str | None, second: str | None = None, group: int = -1,
            top: str | None = None, deep: bool = False) -> None:
        """Import one file (its bytes, or the reason it was refused already): decoded in turn, here or
        in a decoding process, then appended (or rejected, or skipped as a duplicate) in the order given.
        label: its class folder; for a zip member, second, group, top and deep: see add_zip."""
        self.decoder.put(name, data, (label, second, group, top, deep))

    def _decoded(self, name: str, decoded: tuple[np.ndarray, bytes] | str, meta) -> None:
        if isinstance(decoded, str):
            self.reject(name, decoded)
            return
        label, second, group, top, deep = meta
        if self.append(name, *decoded, label, second, group) and group >= 0:
            stats = self.groups[group]
            if stats[0] is None:
                stats[0] = top
            stats[1] = stats[1] and top == stats[0]
            stats[2] = stats[2] or deep

    def append(self, name: str, fitted: np.ndarray, digest: bytes, label: str | None, second: str | None = None,
               group: int = -1) -> bool:
        if self.seen.find(digest, self.hashes.get) is not None:
            self.n_duplicates += 1
            if len(self.duplicates) < LISTED:
                self.duplicates.append(name)
            return False
        channels = fitted.shape[2]
        if self.pixels is None:
            self.pixels = _Rows(self.folder / "pixels.npy", (self.size, self.size, channels), np.uint8)
        elif channels > self.pixels.shape[2]:
            self.pixels = self.pixels.widened((self.size, self.size, channels))
        self.seen.add(digest, self.n)
        self.pixels.append(fitted)
        self.hashes.append(np.frombuffer(digest, np.uint8))
        self.label_rows.append((self._label_id(label), self._label_id(second), group))
        self.names.write(json.dumps(name) + "\n")
        return True

    def add_zip(self, src, name: str, prefix: str, fallback: str | None) -> None:
        """Import a zip's members; labels come from its folders once all members are seen: each
        member keeps its top folder (label) and second folder (second), and the zip's group counts
        whether one top folder holds everything and class folders sit below it (a wrapper)."""
        group = len(self.groups)
        self.groups.append([None, True, False, self._label_id(fallback)])
        for member, item in iter_zip(src, name):
            if isinstance(item, Rejection):
                self.add(prefix + member, item.reason, None)
                continue
            parts = member.split("/")
            self.add(prefix + member, item, parts[0] if len(parts) >= 2 else None,
                     parts[1] if len(parts) >= 3 else None, group, parts[0], len(parts) >= 3)

    def discard(self) -> None:
        self.decoder.close()
        for rows in (self.pixels, self.hashes, self.label_rows):
            if rows is not None:
                rows.discard()
        self.names.close()

    def finish(self, source: str) -> StreamedIngest:
        """Close the files and settle the labels; IngestError when no image is usable."""
        self.decoder.drain()
        self.names.close()
        if self.pixels is None:
            self.discard()
            shown = [f"{r.name}: {r.reason}" for r in self.rejected[:10]]
            if self.n_rejected > 10:
                shown.append(f"and {self.n_rejected - 10} more")
            detail = f" ({'; '.join(shown)})" if shown else ""
            raise IngestError(source, "no usable image" + detail)
        self.pixels.close()
        self.hashes.close()
        work = np.load(self.label_rows.close(), mmap_mode="r")
        wrapper = np.array([stats[0] is not None and stats[1] and stats[2] for stats in self.groups] + [False])
        fallback = np.array([stats[3] for stats in self.groups] + [-1], np.int64)
        by_pool = np.full(len(self.pool), -1, np.int64)
        names = sorted(self.pool)
        labels = np.lib.format.open_memmap(self.folder / "labels.npy", "w+", np.int64, (self.n,))
        used = np.zeros(len(self.pool) + 1, bool)
        step = 1 << 16
        for start in range(0, self.n, step):  # pool ids first, in chunks
            block = np.asarray(work[start:start + step], np.int64)
            group = block[:, 2]
            ids = np.where(wrapper[group], block[:, 1], block[:, 0])
            ids = np.where((group >= 0) & (ids < 0), fallback[group], ids)
            labels[start:start + len(ids)] = ids
            used[ids] = True  # -1 marks the last slot, unused below
        classes = [name for name in names if used[self.pool[name]]]
        for index, name in enumerate(classes):
            by_pool[self.pool[name]] = index
        lookup = np.append(by_pool, -1)  # pool id -1 → -1
        for start in range(0, self.n, step):
            labels[start:start + step] = lookup[labels[start:start + step]]
        labels.flush()
        del labels, work
        (self.folder / "labels.work").unlink()
        return StreamedIngest(self.folder, self.n, self.size, self.pixels.shape[2], classes, self.rejected,
                              self.duplicates, self.n_rejected, self.n_duplicates)

    def result(self, source: str) -> IngestResult:
        return self.finish(source).to_result()


def _looks_like_zip(name: str, data) -> bool:
    if name.lower().endswith(".zip"):
        return True
    if isinstance(data, (bytes, bytearray, memoryview)):
        head = bytes(data[:4])
    elif isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as handle:
            head = handle.read(4)
    else:
        at = data.tell()
        head = data.read(4)
        data.seek(at)
    return head in (b"PK\x03\x04", b"PK\x05\x06")


def _file_bytes(data) -> bytes:
    """An image given as bytes, a path or an open binary file, as bytes (capped one past the
    largest file allowed, so a huge one is refused by its size, not read whole)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as handle:
            return _read_capped(handle, os.fstat(handle.fileno()).st_size)
    data.seek(0)
    return data.read(images.MAX_FILE_BYTES + 1)


def stream_files(files: Iterable[tuple[str, object]], folder: str | os.PathLike, image_size: int = 64,
                 labels: list[str | None] | None = None) -> StreamedIngest:
    """Import (name, data) pairs into files in `folder`; data is bytes, a path or an open binary
    file (an uploaded file), read only when its turn comes. A zip among them is expanded (labels
    from its folders), read member by member from its path or file, never whole.

    ``labels`` (optional) follows ``files``; for a zip it labels members outside class folders.
    Zip members are named ``"<zip name>/<member>"``. Raises IngestError if nothing is usable.
    """
    col = _Collector(image_size, folder)
    try:
        count = 0
        for count, (name, data) in enumerate(files, start=1):
            if labels is not None and count > len(labels):
                raise ValueError("labels is shorter than files")
            label = labels[count - 1] if labels is not None else None
            if _looks_like_zip(name, data):
                try:
                    col.add_zip(data, name, f"{name}/", label)
                except IngestError as exc:  # one bad zip must not cost the other files
                    col.add(name, exc.reason, None)
            else:
                col.add(name, _file_bytes(data), label)
            del data  # only the shrunk pixels are kept
        if labels is not None and count != len(labels):
            raise ValueError(f"labels has {len(labels)} entries for {count} files")
        return col.finish("the uploaded files" if count != 1 else name)
    except BaseException:
        col.discard()
        raise


def stream_zip(path_or_bytes: bytes | str | os.PathLike | BinaryIO, name: str, folder: str | os.PathLike,
               image_size: int = 64) -> StreamedIngest:
    """Import one zip (bytes, a path or an open binary file) into files in `folder`; members keep
    their zip paths."""
    col = _Collector(image_size, folder)
    try:
        col.add_zip(path_or_bytes, name, "", None)
        return col.finish(name)
    except BaseException:
        col.discard()
        raise


def stream_folder(path: str | os.PathLike, folder: str | os.PathLike, image_size: int = 64) -> StreamedIngest:
    """Import a directory tree into files in `folder`; the first-level subfolder is the label
    (files at the top: None). Folders are walked in sorted order, one folder's listing at a time.

    Symlinked folders are not descended, and a file symlink that resolves outside ``path`` is
    refused, so a folder cannot smuggle in /etc or another user's files.
    """
    root = Path(path)
    if not root.is_dir():
        raise IngestError(str(path), "not a folder")
    real_root = root.resolve()
    col = _Collector(image_size, folder)
    try:
        for rel, data in _walk_folder(root, real_root):
            col.add(rel, data, rel.split("/")[0] if "/" in rel else None)
            del data  # only the shrunk pixels are kept
        return col.finish(str(path))
    except BaseException:
        col.discard()
        raise


def _walk_folder(root: Path, real_root: Path, rel: str = "") -> Iterator[tuple[str, bytes | str]]:
    """(path relative to the root, the file's bytes or the reason it is refused) for every file,
    in os.walk's top-down sorted order: a folder's files, then its subfolders one by one."""
    try:
        with os.scandir(root / rel if rel else root) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return
    folders = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()  # follows links, as os.walk sorts them
        except OSError:
            is_dir = False
        if is_dir:
            if not entry.name.startswith(".") and entry.name != "__MACOSX" and not entry.is_symlink():
                folders.append(entry.name)
            continue
        path = f"{rel}/{entry.name}" if rel else entry.name
        if _skipped(path):
            continue
        yield path, _read_entry(entry, real_root)
    for name in folders:
        yield from _walk_folder(root, real_root, f"{rel}/{name}" if rel else name)


def _read_entry(entry: os.DirEntry, real_root: Path) -> bytes | str | tuple[str]:
    """A folder file to read ((its path,): a plain file met without following a link is inside the
    folder, and is read by _read_plain where it is decoded), its bytes (a link, resolved and checked
    here), or the reason it is refused (outside link, not a file, too big)."""
    try:
        if entry.is_symlink():
            return _read_folder_file(Path(entry.path), real_root)
        if not entry.is_file(follow_symlinks=False):
            return "not a regular file"
        return (entry.path,)
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"


def ingest_files(files: Iterable[tuple[str, object]], image_size: int = 64,
                 labels: list[str | None] | None = None) -> IngestResult:
    """stream_files, the result in memory (small inputs; an import stores with stream_files)."""
    with tempfile.TemporaryDirectory(prefix="ingest-") as folder:
        return stream_files(files, folder, image_size, labels).to_result()


def ingest_zip(path_or_bytes: bytes | str | os.PathLike | BinaryIO, name: str,
               image_size: int = 64) -> IngestResult:
    """stream_zip, the result in memory."""
    with tempfile.TemporaryDirectory(prefix="ingest-") as folder:
        return stream_zip(path_or_bytes, name, folder, image_size).to_result()


def ingest_folder(path: str | os.PathLike, image_size: int = 64) -> IngestResult:
    """stream_folder, the result in memory."""
    with tempfile.TemporaryDirectory(prefix="ingest-") as folder:
        return stream_folder(path, folder, image_size).to_result()


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
            return _read_capped(f, os.fstat(f.fileno()).st_size)
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
