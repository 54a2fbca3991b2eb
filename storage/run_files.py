"""Where a run's files live: every path under `runs/<id>/` is spelled here and nowhere else.

Paths come back relative to the data home (what the database stores) unless the name says
absolute. The run's folder holds:

- `encoder-epoch-<N>-<owner>.safetensors` and `training-state-epoch-<N>-<owner>.safetensors`: a
  training run's encoder and what resuming needs, after epoch N, written by the worker holding
  ownership token <owner>. New names every epoch: the run row's `checkpoint` names the current
  pair (the training state is found from it, `training_state_for`), and only the owner's
  compare-and-set that commits the epoch changes it, so a worker that lost its run never
  overwrites the files a row points to (core.runs.worker).
- `encoder.safetensors`, `training-state.safetensors`: the fixed names of an embedding run's
  uploaded encoder and of the runs of earlier versions (still read through their rows).
- `embeddings-<owner>.npy` (`embeddings.npy` in earlier versions): what the row's `embeddings` names.
- `mining/`, `probe/`: per-epoch counts and probe embeddings (core.training.tally_files,
  core.explore.evolution); `index/`, `knn/` (the whole run's k-NN, core.explore.knn), `statistics-k<K>.npz`, `umap-<key>.npy`, `evolution.npy`
  and `evolution.json`: the after-work jobs' results, named by their rows' `path`.
- `duplicates/`: duplicates found by the run's embeddings, one file per threshold (core.explore.duplicates).
- `worker.log`, `projection.log`: the processes' output.
- `.staging-<pid>/`: a process's files before they are made current (storage.artifacts
  .clean_leftovers removes those of a dead process).

No torch and no core here: storage never imports core.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from storage.settings import data_home

RUNS_FOLDER = "runs"
ENCODER_FILE = "encoder.safetensors"
TRAINING_STATE_FILE = "training-state.safetensors"
EMBEDDINGS_FILE = "embeddings.npy"
MINING_FOLDER = "mining"
PROBE_FOLDER = "probe"
INDEX_FOLDER = "index"
KNN_FOLDER = "knn"
EVOLUTION_FILE = "evolution.npy"
EVOLUTION_INFO = "evolution.json"
DUPLICATES_FOLDER = "duplicates"
STAGING_FOLDER = re.compile(r"^\.staging-(\d+)$")
_ENCODER_STEM = "encoder"
_STATE_STEM = "training-state"
_EPOCH_FILE = re.compile(r"^(encoder|training-state)-epoch-\d+-[0-9a-f]+\.safetensors$")
OWNER_CHARS = 12  # of the ownership token in a file name: enough that two owners never share one


@dataclass(frozen=True)
class RunFiles:
    """The files of run `run_id`."""

    run_id: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_id", int(self.run_id))

    @property
    def folder(self) -> str:
        return f"{RUNS_FOLDER}/{self.run_id}"

    def relative(self, name: str) -> str:
        """`name` inside the run's folder, relative to the data home."""
        return f"{self.folder}/{name}"

    def absolute(self, name: Optional[str] = None) -> Path:
        """The run's folder (name None) or `name` inside it, as an absolute path."""
        folder = data_home() / RUNS_FOLDER / str(self.run_id)
        return folder if name is None else folder / name

    def make(self) -> Path:
        """The run's folder, created if missing."""
        folder = self.absolute()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def remove(self) -> None:
        shutil.rmtree(self.absolute(), ignore_errors=True)

    # ------------------------------------------------------------ encoder and training state

    @property
    def encoder(self) -> str:
        """The fixed name: an embedding run's encoder, and a training run's of earlier versions."""
        return self.relative(ENCODER_FILE)

    def epoch_encoder(self, epoch: int, owner: str) -> str:
        """A training run's encoder after `epoch`, written by the holder of token `owner`."""
        return self.relative(f"{_ENCODER_STEM}-epoch-{int(epoch)}-{owner[:OWNER_CHARS]}.safetensors")

    def training_state_for(self, checkpoint: Optional[str]) -> str:
        """The training state written with the encoder `checkpoint` (a row's `checkpoint`); the
        fixed name for a run of an earlier version, or one whose row names none."""
        name = Path(checkpoint).name if checkpoint else ENCODER_FILE
        if not name.startswith(_ENCODER_STEM):
            name = ENCODER_FILE
        return self.relative(_STATE_STEM + name[len(_ENCODER_STEM):])

    def stale_epoch_files(self, keep: Optional[str]) -> list[Path]:
        """The run's per-epoch encoder and training-state files other than the pair of the
        encoder `keep` (absolute): left by a worker that lost its run or died before its epoch
        was committed."""
        folder = self.absolute()
        if not folder.is_dir():
            return []
        kept = {Path(keep).name, Path(self.training_state_for(keep)).name} if keep else set()
        return sorted(p for p in folder.iterdir() if _EPOCH_FILE.match(p.name) and p.name not in kept)

    # ------------------------------------------------------------ embeddings and after-work

    def embeddings_of(self, owner: str) -> str:
        """The embeddings written by the holder of token `owner` (a new name per writer)."""
        return self.relative(f"embeddings-{owner[:OWNER_CHARS]}.npy")

    @property
    def mining_folder(self) -> str:
        return self.relative(MINING_FOLDER)

    @property
    def probe_folder(self) -> str:
        return self.relative(PROBE_FOLDER)

    @property
    def index(self) -> str:
        """The approximate search index's folder (runs past core.explore.search.APPROXIMATE_ABOVE)."""
        return self.relative(INDEX_FOLDER)

    @property
    def knn(self) -> str:
        """The whole run's k-NN folder (core.explore.knn), written by its first job that needs it."""
        return self.relative(KNN_FOLDER)

    def statistics(self, k: int) -> str:
        return self.relative(f"statistics-k{int(k)}.npz")

    def umap(self, digest: str) -> str:
        """The UMAP map of the parameters whose key hashes to `digest`."""
        return self.relative(f"umap-{digest}.npy")

    @property
    def evolution(self) -> str:
        return self.relative(EVOLUTION_FILE)

    @property
    def evolution_info(self) -> str:
        return self.relative(EVOLUTION_INFO)

    @property
    def duplicates_folder(self) -> str:
        """Duplicates found by the run's embeddings (core.explore.duplicates), one file per threshold."""
        return self.relative(DUPLICATES_FOLDER)

    def log(self, name: str) -> Path:
        """A process's log file (absolute), its folder created."""
        return self.make() / name

    def staging(self, pid: int) -> Path:
        """Where process `pid` writes the run's files before making them current (absolute)."""
        return self.absolute(f".staging-{int(pid)}")
