"""Import streams: its peak memory does not grow with the number of images, and decoding in a pool
of processes gives the very dataset that decoding in one process gives."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from storage.db import make_engine
    from core.data.importing import import_paths
    report = import_paths(make_engine(), [Path(sys.argv[1])], name="scale", image_size=int(sys.argv[2]))
    # VmHWM, not getrusage's ru_maxrss: that one starts from the RSS of the process that forked this
    # one (pytest's, hundreds of MB after other tests), which would hide the import's own peak
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"images": report.n_images, "classes": len(report.classes), "maxrss_kb": peak}))
""")


def _import_in_a_process(tmp_path: Path, zip_path: Path, size: int, threads: str) -> dict:
    home = tmp_path / f"home-{zip_path.stem}"
    env = dict(os.environ, EMBEDDING_LAB_HOME=str(home), EMBEDDING_LAB_THREADS=threads,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _CHILD, str(zip_path), str(size)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_peak_memory_is_the_same_at_two_sizes(tmp_path):
    """1,500 and 12,000 images, 64×64 as stored (4 KB of pixels each): an import that held the
    pixels would need over 40 MB more at the larger size (twice that while it copied them into one
    array); a streamed one stays within 30 MB."""
    from bench.scale import write_zip

    small = write_zip(tmp_path / "small.zip", 1_500, side=16, seed=1)
    large = write_zip(tmp_path / "large.zip", 12_000, side=16, seed=2)
    # one decoding process: the pool's processes would not count in this process's peak anyway
    a = _import_in_a_process(tmp_path, small, 64, "1")
    b = _import_in_a_process(tmp_path, large, 64, "1")
    assert (a["images"], b["images"]) == (1_500, 12_000) and a["classes"] == b["classes"] == 10
    grown_mb = (b["maxrss_kb"] - a["maxrss_kb"]) / 1024
    assert grown_mb < 30, f"peak RSS grew {grown_mb:.1f} MB from 1,500 to 12,000 images ({a} → {b})"


def test_a_pool_of_decoding_processes_gives_the_same_dataset(tmp_path, monkeypatch):
    """Past PARALLEL_AFTER images the import decodes in processes: same pixels, names, labels,
    digests, duplicates and refusals, in the same order, as decoding here."""
    from bench.scale import png_bytes, synthetic_batches
    from core.data import ingest

    root = tmp_path / "folder"
    for i, c, image in synthetic_batches(300, side=12, seed=3):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        (root / f"c{c}" / f"{i:04d}.png").write_bytes(png_bytes(image))
    (root / "c1" / "0150-copy.png").write_bytes((root / "c1" / "0001.png").read_bytes())
    (root / "c2" / "0200-broken.png").write_bytes(b"\x89PNG broken")
    gray_then_colour = root / "c9" / "9999-colour.bmp"
    from PIL import Image
    Image.fromarray(np.full((12, 12, 3), (200, 10, 10), np.uint8)).save(gray_then_colour)

    monkeypatch.setenv("EMBEDDING_LAB_THREADS", "1")
    serial = ingest.ingest_folder(root, image_size=10)
    monkeypatch.setenv("EMBEDDING_LAB_THREADS", "2")
    monkeypatch.setattr(ingest, "PARALLEL_AFTER", 40)
    monkeypatch.setattr(ingest, "CHUNK_IMAGES", 16)
    started = []
    real_start = ingest._Decoder._start

    def counted(self):
        started.append(True)
        return real_start(self)

    monkeypatch.setattr(ingest._Decoder, "_start", counted)
    pooled = ingest.ingest_folder(root, image_size=10)
    assert started, "the pool never started"
    assert serial.pixels.shape == (301, 10, 10, 3)  # the colour image came last: gray rows widened
    assert np.array_equal(serial.pixels, pooled.pixels)
    assert serial.names == pooled.names and serial.labels == pooled.labels and serial.hashes == pooled.hashes
    assert serial.duplicates == pooled.duplicates == ["c1/0150-copy.png"]
    assert [(r.name, r.reason) for r in serial.rejected] == [(r.name, r.reason) for r in pooled.rejected]
    assert [r.name for r in pooled.rejected] == ["c2/0200-broken.png"]


ZIP_CASES = ["test_class_folder_zip_gives_labels_and_counts", "test_wrapped_class_folders_use_the_second_level",
             "test_directories_macosx_and_dotfiles_are_skipped_silently", "test_unsafe_member_names_are_rejected",
             "test_zip_bomb_ratio_is_refused_before_reading", "test_member_whose_declared_size_lies_is_rejected",
             "test_reading_stops_at_the_byte_cap", "test_honest_oversized_member_is_refused_without_reading",
             "test_total_uncompressed_size_is_capped", "test_encrypted_member_is_rejected",
             "test_zip_over_the_member_cap", "test_zip_from_a_path", "test_a_bad_zip_among_files_is_one_rejection"]


def test_the_large_zip_reader_keeps_every_zip_check(tmp_path):
    """A zip listing more than ZIPFILE_MOST entries is read a directory entry at a time instead of
    through zipfile.ZipFile: every zip test of test_ingest, through that reader, gives the same."""
    import inspect

    from core.data import ingest
    from tests import test_ingest

    used = []
    real = ingest._iter_large_zip

    def counted(fp, name):
        used.append(name)
        return real(fp, name)

    for case in ZIP_CASES:
        test = getattr(test_ingest, case)
        with pytest.MonkeyPatch.context() as patch:  # each case's own patches undone after it
            patch.setattr(ingest, "ZIPFILE_MOST", -1)  # every zip through _iter_large_zip
            patch.setattr(ingest, "_iter_large_zip", counted)
            given = {"monkeypatch": patch, "tmp_path": tmp_path / case}
            (tmp_path / case).mkdir()
            test(**{name: given[name] for name in inspect.signature(test).parameters})
    assert len(used) >= len(ZIP_CASES)


def test_a_zip_of_more_entries_than_zipfile_is_given_streams(tmp_path, monkeypatch):
    """Past ZIPFILE_MOST entries (lowered here) the import neither builds zipfile's directory nor
    loses a member: labels from the class folders, every image, in order."""
    import zipfile

    from bench.scale import write_zip
    from core.data import ingest

    archive = write_zip(tmp_path / "big.zip", 120, side=10)
    monkeypatch.setattr(ingest, "ZIPFILE_MOST", 50)
    monkeypatch.setattr(zipfile.ZipFile, "__init__", None)  # zipfile's reader would fail loudly
    result = ingest.ingest_zip(archive, "big.zip", image_size=10)
    assert len(result.names) == 120 and result.names[:2] == ["class0/0000000.png", "class1/0000001.png"]
    assert result.labels[:3] == ["class0", "class1", "class2"] and not result.rejected
