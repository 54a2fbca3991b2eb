"""A run's paths have one owner (storage.run_files.RunFiles); a writer's epoch files get new names
and the row's checkpoint says which are current."""
import re
from pathlib import Path

from storage.run_files import RunFiles

ROOT = Path(__file__).resolve().parents[1]
# a path under a run's folder spelled by hand: f"runs/{...}", "runs/" + ..., / "runs" / ...
HAND_SPELLED = re.compile(r"""f["'][^"'\n]*\bruns/|["']runs/["']\s*\+|/\s*["']runs["']""")


def test_no_module_outside_run_files_spells_a_run_path():
    offenders = []
    for folder in ("core", "pages", "storage", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "run_files.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if HAND_SPELLED.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_pattern_catches_the_spellings_it_forbids():
    assert HAND_SPELLED.search('relative = f"runs/{run_id}/embeddings.npy"')
    assert HAND_SPELLED.search("home / 'runs' / str(run_id)")
    assert not HAND_SPELLED.search("- `runs/<id>/probe/positions.npy`: the probe's positions")


def test_a_training_state_is_found_from_the_encoder_its_row_names(sqlite_home):
    files = RunFiles(7)
    encoder = files.epoch_encoder(3, "0123456789abcdef0123")
    assert encoder == "runs/7/encoder-epoch-3-0123456789ab.safetensors"
    assert files.training_state_for(encoder) == "runs/7/training-state-epoch-3-0123456789ab.safetensors"
    # a run of an earlier version (fixed names), or a row that names no encoder yet
    assert files.training_state_for(files.encoder) == "runs/7/training-state.safetensors"
    assert files.training_state_for(None) == "runs/7/training-state.safetensors"
    assert files.absolute(Path(encoder).name) == sqlite_home / encoder


def test_stale_epoch_files_are_every_epoch_pair_but_the_current_one(sqlite_home):
    files = RunFiles(4)
    files.make()
    current = files.epoch_encoder(2, "b" * 32)
    names = [current, files.training_state_for(current), files.epoch_encoder(2, "a" * 32),
             files.training_state_for(files.epoch_encoder(2, "a" * 32)), files.epoch_encoder(1, "b" * 32),
             files.encoder, files.training_state_for(None), files.relative("embeddings.npy")]
    for name in names:
        (sqlite_home / name).write_bytes(b"x")
    stale = {p.name for p in files.stale_epoch_files(current)}
    assert stale == {Path(n).name for n in names[2:5]}  # fixed names and other files are never stale
    assert len(files.stale_epoch_files(None)) == 5
