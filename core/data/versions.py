"""Dataset versions: fix the data, then train again on the fixed version.

A dataset has versions 1, 2, ...: version 1 is the images as imported; every later version is its
parent version (the newest one unless another is named) plus its own edits, stored as rows, never
as a copy of the pixels:

- relabel: the image gets another of the dataset's classes;
- exclude: the image is left out of training and of the metrics (it is still embedded, so every run
  of the dataset has one row per image and maps, exports and comparisons line up by position);
- tag: a text attached to the image (kept, shown, exported; training ignores it).

Edits accumulate along the parents: a later relabel of an image wins, an exclusion stays, tags
add up. An image is named by its position (its row in the dataset's pixel array): the id the pages,
the search results, the triplets and the Parquet export show.

A run records the version it trained on (runs.dataset_version) and every reader of its labels
reads through it (storage.queries.run_image_table), so an edit never changes a run's map, metrics or
exports. A version is deleted only when no run uses it and no other version edits it (version 1,
the imported images, never): every run's version stays reproducible.

`NAME@VERSION` (or `ID@VERSION`) names a version wherever a dataset is named; a bare `NAME` is its
newest version. `resolve_dataset_version` reads it.

Every edit is checked whole before anything is stored (unknown dataset, version, image or label,
an image both relabelled and excluded, an edit that changes nothing, one that would leave fewer
than two images); ValueError or LookupError with one sentence, and nothing is stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import IntegrityError

from core import access
from core.data.datasets import builtin_names, resolve_dataset
from storage import queries
from storage.db import transaction
from storage.schema import Dataset, DatasetVersion, Deletion, ImageEdit, ImageRow, Run

EDIT_KINDS = ("relabel", "exclude", "tag")
LONGEST_TAG = ImageEdit.__table__.c.tag.type.length
LONGEST_NOTE = 500
SHOWN_IDS = 5  # a message names at most this many image ids, then says how many more


# ---------------------------------------------------------------- naming a version


def parse_dataset_ref(text: str) -> tuple[str, Optional[int]]:
    """"NAME@VERSION" → ("NAME", VERSION); "NAME" → ("NAME", None). ValueError with a sentence for
    a malformed version ("NAME@", "NAME@two", "NAME@0") or a missing name ("@2")."""
    text = (text or "").strip()
    if "@" not in text:
        return text, None
    name, _, version = text.rpartition("@")
    name = name.strip()
    if not name:
        raise ValueError(f"{text!r} names no dataset before the @: give NAME@VERSION, e.g. digits@2")
    version = version.strip()
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise ValueError(f"{text!r} has no valid version after the @: give NAME@VERSION with VERSION a "
                         "whole number from 1, e.g. digits@2")
    return name, int(version)


def resolve_dataset_version(engine: Engine, ref: Union[str, int],
                            version: Optional[int] = None) -> tuple[Dataset, int]:
    """The dataset and version that `ref` names: NAME, ID, NAME@VERSION or ID@VERSION (a bare name
    or id: its newest version, unless `version` is given). Built-ins are imported on first use.
    LookupError naming what is missing (the dataset, or the version with the ones it has);
    ValueError for a malformed reference or one that gives two different versions.

    This is the one place the command line, the pages and the services read a dataset's name."""
    if isinstance(ref, str):
        name, named = parse_dataset_ref(ref)
        if named is not None and version is not None and named != version:
            raise ValueError(f"{ref!r} names version {named} but version {version} was asked for; give one")
        version = named if named is not None else version
        try:  # a built-in is imported on first use, but not to be told it has no such version
            dataset = resolve_dataset(engine, name, import_builtin=version in (None, 1))
        except LookupError:
            if name in builtin_names() and version not in (None, 1):
                raise LookupError(f"dataset {name!r} has no version {version}: it is built in and not imported "
                                  "yet, so it has only version 1") from None
            raise
    else:
        dataset = resolve_dataset(engine, ref)
    with transaction(engine) as session:
        numbers = _version_numbers(session, dataset.id)
    if version is None:
        return dataset, numbers[-1]
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version not in numbers:
        raise LookupError(f"dataset {dataset.name!r} has no version {version}; its versions are "
                          f"{_listed(numbers)} (`python -m core versions --dataset {dataset.name}` lists them)")
    return dataset, int(version)


def version_ref(name: str, version: int) -> str:
    """How a version is named: NAME@VERSION."""
    return f"{name}@{version}"


def _version_numbers(session, dataset_id: int) -> list[int]:
    """The dataset's versions, ascending; 1 always (a dataset's imported images)."""
    return sorted({1, *(row.version for row in queries.version_rows(session, dataset_id))})


def _listed(values: Sequence, most: int = SHOWN_IDS) -> str:
    shown = ", ".join(str(v) for v in list(values)[:most])
    return shown + (f" and {len(values) - most} more" if len(values) > most else "")


# ---------------------------------------------------------------- reading a version


@dataclass(frozen=True)
class VersionEdits:
    """What one version changed over its parent. relabelled: (position, label before, label after)
    by class name (before: None for an image that had none); excluded: positions; tagged:
    (position, tag)."""

    relabelled: tuple[tuple[int, Optional[str], str], ...] = ()
    excluded: tuple[int, ...] = ()
    tagged: tuple[tuple[int, str], ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        return {"relabelled": len(self.relabelled), "excluded": len(self.excluded), "tagged": len(self.tagged)}

    def summary(self) -> str:
        """E.g. "3 relabelled, 1 excluded" ("the imported images" for none)."""
        parts = [f"{n} {what}" for what, n in self.counts.items() if n]
        return ", ".join(parts) if parts else "the imported images"


@dataclass(frozen=True)
class VersionInfo:
    """A version as the Data page and `python -m core versions` show it: its parent, note, what it
    changed, how many images it uses (not excluded), the runs that used it, and what would make
    training on it degenerate (a class with no training image left, say)."""

    dataset_id: int
    dataset_name: str
    version: int
    parent: Optional[int]
    note: Optional[str]
    created_at: Optional[datetime]
    edits: VersionEdits
    n_images: int
    runs: tuple[int, ...]
    warnings: tuple[str, ...]

    @property
    def ref(self) -> str:
        return version_ref(self.dataset_name, self.version)

    def as_dict(self, with_edits: bool = True) -> dict:
        """Plain JSON values (the command line's --json)."""
        out = {"dataset": self.dataset_name, "dataset_id": self.dataset_id, "version": self.version,
               "ref": self.ref, "parent": self.parent, "note": self.note,
               "created_at": None if self.created_at is None else self.created_at.isoformat(timespec="seconds"),
               **self.edits.counts, "images": self.n_images, "runs": list(self.runs), "warnings": list(self.warnings)}
        if with_edits:
            out["edits"] = {"relabel": [{"image": p, "from": a, "to": b} for p, a, b in self.edits.relabelled],
                            "exclude": list(self.edits.excluded),
                            "tag": [{"image": p, "tag": t} for p, t in self.edits.tagged]}
        return out


def list_versions(engine: Engine, dataset: Union[str, int]) -> list[VersionInfo]:
    """Every version of the dataset (a name, id or NAME@VERSION: the dataset part is used), oldest first."""
    target = resolve_dataset(engine, parse_dataset_ref(dataset)[0] if isinstance(dataset, str) else dataset)
    with transaction(engine) as session:
        return _infos(session, session.get(Dataset, target.id))


def describe_version(engine: Engine, dataset: Union[str, int], version: Optional[int] = None) -> VersionInfo:
    """One version (NAME@VERSION, or NAME / ID with `version`; the newest when neither names one)."""
    target, number = resolve_dataset_version(engine, dataset, version)
    with transaction(engine) as session:
        return next(info for info in _infos(session, session.get(Dataset, target.id)) if info.version == number)


def _infos(session, dataset: Dataset) -> list[VersionInfo]:
    rows = {row.version: row for row in queries.version_rows(session, dataset.id)}
    numbers = sorted({1, *rows})
    # the imported labels and splits only (no names): a page reads this on every rerun
    base = session.connection().execute(select(ImageRow.position, ImageRow.label, ImageRow.split)
                                        .where(ImageRow.dataset_id == dataset.id).order_by(ImageRow.position)).all()
    classes = list(dataset.classes)
    labels = np.array([-1 if label is None else label for _, label, _ in base], dtype=np.int64)
    split = np.array([image_split for _, _, image_split in base])
    position_row = {position: i for i, (position, _, _) in enumerate(base)}
    by_version: dict[int, list[ImageEdit]] = {number: [] for number in numbers}
    ids = {row.id: number for number, row in rows.items()}
    if ids:
        for edit in session.scalars(select(ImageEdit).where(ImageEdit.version_id.in_(ids)).order_by(ImageEdit.id)):
            by_version[ids[edit.version_id]].append(edit)
    runs: dict[int, list[int]] = {}
    for run_id, number in session.execute(select(Run.id, Run.dataset_version).where(Run.dataset_id == dataset.id)
                                          .order_by(Run.id)):
        runs.setdefault(number, []).append(run_id)
    states: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # version → (labels, excluded)

    def state(number: int) -> tuple[np.ndarray, np.ndarray]:
        if number not in states:
            parent = rows[number].parent if number in rows else None
            if number == 1 or parent is None or parent not in numbers or parent >= number:
                states[number] = (labels.copy(), np.zeros(len(labels), dtype=bool))
            else:
                before_labels, before_excluded = state(parent)
                now_labels, now_excluded = before_labels.copy(), before_excluded.copy()
                for edit in by_version[number]:
                    i = position_row.get(edit.position)
                    if i is None:
                        continue
                    if edit.kind == "relabel" and edit.label is not None:
                        now_labels[i] = edit.label
                    elif edit.kind == "exclude":
                        now_excluded[i] = True
                states[number] = (now_labels, now_excluded)
        return states[number]

    infos = []
    for number in numbers:
        row = rows.get(number)
        parent = row.parent if row is not None else None
        before = state(parent)[0] if parent is not None and parent in numbers else labels
        relabelled, excluded, tagged = [], [], []
        for edit in by_version[number] if number != 1 else []:
            if edit.kind == "relabel":
                i = position_row.get(edit.position)
                old = None if i is None or before[i] < 0 else _name(classes, int(before[i]))
                relabelled.append((edit.position, old, _name(classes, edit.label)))
            elif edit.kind == "exclude":
                excluded.append(edit.position)
            elif edit.kind == "tag":
                tagged.append((edit.position, edit.tag))
        now_labels, now_excluded = state(number)
        infos.append(VersionInfo(
            dataset_id=dataset.id, dataset_name=dataset.name, version=number, parent=parent,
            note=row.note if row is not None else "imported", created_at=row.created_at if row is not None else dataset.created_at,
            edits=VersionEdits(tuple(relabelled), tuple(excluded), tuple(tagged)),
            n_images=int((~now_excluded).sum()), runs=tuple(runs.get(number, ())),
            warnings=tuple(training_warnings(now_labels, split, now_excluded, classes))))
    return infos


def _name(classes: Sequence[str], label: Optional[int]) -> str:
    if label is None:
        return "unlabeled"
    return classes[label] if 0 <= label < len(classes) else str(label)


def training_warnings(labels: np.ndarray, split: np.ndarray, excluded: np.ndarray,
                      classes: Sequence[str]) -> list[str]:
    """What would make training or measuring on these images degenerate, one sentence each:
    labels (N,) class indices (-1 unlabeled), split (N,), excluded (N,) bool. A class with no image
    left, a class with no training image left (the test images still query it: they can never find
    a match learnt for them), fewer than two classes left (no supervised objective can train)."""
    if not classes:
        return []
    used = ~excluded
    training = used & (split == "train") if ((split == "train") & used).any() else used
    everywhere = np.bincount(labels[used & (labels >= 0)], minlength=len(classes))
    trained = np.bincount(labels[training & (labels >= 0)], minlength=len(classes))
    warnings = []
    gone = [classes[c] for c in range(len(classes)) if everywhere[c] == 0]
    if gone:
        warnings.append(f"no image of class {_listed([repr(c) for c in gone])} is left")
    untrained = [classes[c] for c in range(len(classes)) if trained[c] == 0 and everywhere[c] > 0]
    if untrained:
        warnings.append(f"class {_listed([repr(c) for c in untrained])} has no training image left; "
                        "its test images are still queries")
    if int((everywhere > 0).sum()) < 2:
        warnings.append("fewer than two classes are left: a supervised objective cannot train on this version")
    return warnings


# ---------------------------------------------------------------- making a version


def parse_edits(relabel: Iterable[str] = (), exclude: Iterable[str] = (),
                tag: Iterable[str] = ()) -> tuple[dict[int, str], list[int], dict[int, list[str]]]:
    """The command line's and the Data page's words as make_version's arguments: relabel and tag
    "ID=TEXT" each, exclude "ID" each. ValueError naming the first malformed one."""
    relabelled: dict[int, str] = {}
    for item in relabel:
        position, label = _pair(item, "relabel", "ID=LABEL")
        if relabelled.get(position, label) != label:
            raise ValueError(f"image {position} is relabelled twice ({relabelled[position]!r} and {label!r}); "
                             "give it one label")
        relabelled[position] = label
    excluded = [_image_id(item, "exclude", str(item)) for item in exclude]
    tags: dict[int, list[str]] = {}
    for item in tag:
        position, text = _pair(item, "tag", "ID=TAG")
        tags.setdefault(position, []).append(text)
    return relabelled, excluded, tags


def parse_edit_text(relabel: str = "", exclude: str = "", tag: str = "") -> tuple[dict[int, str], list[int],
                                                                             dict[int, list[str]]]:
    """The Data page's form as make_version's arguments: relabel "ID=LABEL" items separated by
    commas or new lines, exclude ids separated by commas or spaces, tag "ID=TAG" one per line
    (a tag may hold a comma). parse_edits' sentences."""
    import re

    return parse_edits([item for item in re.split(r"[,\n]", relabel or "") if item.strip()],
                       [item for item in re.split(r"[,\s]+", exclude or "") if item.strip()],
                       [item for item in (tag or "").splitlines() if item.strip()])


def _pair(item: str, flag: str, form: str) -> tuple[int, str]:
    key, equals, value = str(item).partition("=")
    if not equals:
        raise ValueError(f"{flag} {item!r} is not {form}: give the image id, '=' and the value, e.g. 12=value")
    return _image_id(key, flag, item), value.strip()


def _image_id(text, flag: str, item: str) -> int:
    text = str(text).strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{flag} {item!r}: image ids are whole numbers from 0 (the position the pages and "
                         f"exports show), got {text!r}")
    return int(text)


def make_version(engine: Engine, dataset: Union[str, int], relabel: Optional[Mapping[int, str]] = None,
                 exclude: Iterable[int] = (), tag: Optional[Mapping[int, Union[str, Sequence[str]]]] = None,
                 note: Optional[str] = None, parent: Optional[int] = None) -> int:
    """Store a new version of `dataset` (a name, id or NAME@VERSION) made of edits over its parent
    (the version named, `parent`, or else the newest); returns its number.

    relabel: position → class name (one of the dataset's classes); exclude: positions; tag:
    position → a tag or several (at most LONGEST_TAG characters each). Edits that change nothing
    (an image relabelled to the label it has, excluded again, a tag it has) are dropped. Checked
    whole before anything is stored: ValueError / LookupError with one sentence for an unknown
    dataset, version, image or label, an image both relabelled and excluded (or relabelled when
    its parent excludes it), an edit that changes nothing, or one that would leave fewer than two
    images. Edits that leave a class without training images are stored, and said by the
    version's warnings (describe_version)."""
    access.require("edit")
    target, base = resolve_dataset_version(engine, dataset, parent)
    relabel = dict(relabel or {})
    exclude = list(exclude)
    tags = {position: [texts] if isinstance(texts, str) else list(texts) for position, texts in (tag or {}).items()}
    note = _checked_note(note)
    if not (relabel or exclude or any(tags.values())):
        raise ValueError("an edit needs at least one image to relabel, exclude or tag")
    with transaction(engine, what=f"store a version of dataset {target.name!r}") as session:
        # on a server database, one edit of a dataset at a time: the next number is decided once
        dataset_row = session.scalar(select(Dataset).where(Dataset.id == target.id).with_for_update())
        if dataset_row is None:
            raise LookupError(f"dataset {target.name!r} was deleted meanwhile; nothing was stored")
        if base not in _version_numbers(session, target.id):
            raise LookupError(f"version {base} of dataset {target.name!r} was deleted meanwhile; nothing was stored")
        edits = _checked_edits(session, dataset_row, base, relabel, exclude, tags)
        number = max(_version_numbers(session, target.id)) + 1
        row = DatasetVersion(dataset_id=target.id, version=number, parent=base, note=note)
        session.add(row)
        try:
            session.flush()
        except IntegrityError:  # another process stored this number between our read and our write
            raise ValueError(f"another edit of dataset {target.name!r} was stored at the same moment; "
                             "nothing was stored, try again") from None
        session.add_all(ImageEdit(version_id=row.id, **edit) for edit in edits)
    return number


def edit_selection(engine: Engine, dataset: Union[str, int], positions: Iterable[int],
                   relabel_to: Optional[str] = None, exclude: bool = False, tag: Optional[str] = None,
                   note: Optional[str] = None, parent: Optional[int] = None) -> int:
    """A version from a selection (a lasso on the map, the label errors, the duplicates): every
    image in `positions` relabelled to `relabel_to`, excluded, and/or tagged with `tag`; returns
    its number. make_version's checks and sentences."""
    positions = list(dict.fromkeys(positions))
    if not positions:
        raise ValueError("the selection is empty: select some images first")
    if relabel_to is None and not exclude and tag is None:
        raise ValueError("say what to do with the selection: relabel, exclude or tag it")
    return make_version(engine, dataset, relabel={p: relabel_to for p in positions} if relabel_to is not None else None,
                        exclude=positions if exclude else (), tag={p: tag for p in positions} if tag is not None else None,
                        note=note, parent=parent)


def _checked_note(note: Optional[str]) -> Optional[str]:
    note = (note or "").strip() or None
    if note is not None and len(note) > LONGEST_NOTE:
        raise ValueError(f"a version's note can have at most {LONGEST_NOTE} characters; this one has {len(note)}")
    return note


def _checked_edits(session, dataset: Dataset, base: int, relabel: dict, exclude: list,
                   tags: dict[int, list[str]]) -> list[dict]:
    """The ImageEdit rows of an edit over version `base`, each checked; ValueError / LookupError
    with a sentence for the first thing wrong."""
    n = dataset.n_images
    what = f"dataset {dataset.name!r}"
    wrong = [p for p in [*relabel, *exclude, *tags] if isinstance(p, bool) or not isinstance(p, (int, np.integer))]
    if wrong:
        raise ValueError(f"image ids are whole numbers (positions), got {wrong[0]!r}")
    missing = sorted({int(p) for p in [*relabel, *exclude, *tags] if not 0 <= p < n})
    if missing:
        which = f"image {missing[0]} does not" if len(missing) == 1 else f"images {_listed(missing)} do not"
        raise LookupError(f"{which} exist in {what}: its image ids are 0 to {n - 1}")
    classes = list(dataset.classes)
    if relabel and not classes:
        raise ValueError(f"{what} is unlabeled, so its images cannot be relabelled")
    index = {name: i for i, name in enumerate(classes)}
    for position, label in relabel.items():
        if not isinstance(label, str) or label.strip() not in index:
            raise LookupError(f"{what} has no label {label!r} (image {position}); its labels are "
                              f"{_listed([repr(c) for c in classes], 10)}")
    both = sorted(set(relabel) & set(exclude))
    if both:
        raise ValueError(f"image {both[0]} is both relabelled and excluded; choose one")
    for position, texts in tags.items():
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"the tag of image {position} is empty; give some text")
            if len(text.strip()) > LONGEST_TAG or "\n" in text:
                raise ValueError(f"the tag of image {position} must be one line of at most {LONGEST_TAG} characters")

    table = queries.dataset_image_table(session, dataset.id, base)
    by_position = {image.position: image for image in table}
    excluded_before = sorted(p for p in relabel if by_position[p].excluded)
    if excluded_before:
        raise ValueError(f"image {excluded_before[0]} is excluded in version {base}, so relabelling it changes "
                         f"nothing; edit an earlier version to keep it")
    edits = []
    for position, label in sorted(relabel.items()):
        if by_position[position].label != index[label.strip()]:
            edits.append({"position": int(position), "kind": "relabel", "label": index[label.strip()]})
    for position in sorted(set(exclude)):
        if not by_position[position].excluded:
            edits.append({"position": int(position), "kind": "exclude"})
    for position, texts in sorted(tags.items()):
        for text in dict.fromkeys(t.strip() for t in texts):
            if text not in by_position[position].tags:
                edits.append({"position": int(position), "kind": "tag", "tag": text})
    if not edits:
        raise ValueError(f"the edit changes nothing in {version_ref(dataset.name, base)}: those images already "
                         "have those labels, exclusions and tags")
    leaving = set(exclude)
    left = sum(1 for image in table if not image.excluded and image.position not in leaving)
    if left < 2:
        raise ValueError(f"the edit would leave {left} image{'' if left == 1 else 's'} of {what}; a version "
                         "needs at least two to train on")
    return edits


# ---------------------------------------------------------------- deleting a version


def delete_version(engine: Engine, dataset: Union[str, int], version: Optional[int] = None) -> None:
    """Delete a version (NAME@VERSION, or NAME / ID with `version`) and its edits. Refused, with a
    sentence, for version 1 (the imported images), for a version a run uses (whatever the run's
    status: its map, metrics and exports read through it) and for one another version edits (its
    edits are part of that one). Nothing else changes; the deletion is recorded with who and when."""
    access.require("delete")
    if isinstance(dataset, str) and parse_dataset_ref(dataset)[1] is None and version is None:
        raise ValueError(f"say which version of {dataset!r} to delete: NAME@VERSION")
    target, number = resolve_dataset_version(engine, dataset, version)
    ref = version_ref(target.name, number)
    if number == 1:
        raise ValueError(f"{ref} is the imported images; a dataset's version 1 cannot be deleted")
    with transaction(engine, what=f"delete {ref}") as session:
        row = session.scalar(select(DatasetVersion).where(DatasetVersion.dataset_id == target.id,
                                                          DatasetVersion.version == number).with_for_update())
        if row is None:
            raise LookupError(f"{ref} was deleted meanwhile")
        runs = session.scalars(select(Run.id).where(Run.dataset_id == target.id, Run.dataset_version == number)
                               .order_by(Run.id)).all()
        if runs:
            which = f"run {runs[0]} uses" if len(runs) == 1 else f"runs {_listed(runs)} use"
            raise ValueError(f"{ref} cannot be deleted: {which} it (its map, metrics and exports read its labels); "
                             "delete those runs first")
        children = session.scalars(select(DatasetVersion.version).where(
            DatasetVersion.dataset_id == target.id, DatasetVersion.parent == number).order_by(DatasetVersion.version)).all()
        if children:
            which = f"version {children[0]} edits" if len(children) == 1 else f"versions {_listed(children)} edit"
            raise ValueError(f"{ref} cannot be deleted: {which} it; delete those first")
        # once more in the one statement that deletes, under the database's write lock: a run (or a
        # version) created on it since the reads above keeps it (SQLite runs those reads outside
        # the transaction)
        used = select(Run.id).where(Run.dataset_id == target.id, Run.dataset_version == number)
        edited = select(DatasetVersion.id).where(DatasetVersion.dataset_id == target.id,
                                                 DatasetVersion.parent == number)
        gone = session.execute(delete(DatasetVersion).where(DatasetVersion.id == row.id, ~used.exists(),
                                                            ~edited.exists()))
        if gone.rowcount != 1:
            raise ValueError(f"{ref} cannot be deleted: a run or a version was made on it meanwhile")
        session.execute(delete(ImageEdit).where(ImageEdit.version_id == row.id))
        session.add(Deletion(kind="version", object_id=row.id, what=ref, deleted_by=access.who()))


def version_line(info: VersionInfo) -> str:
    """One line of `python -m core versions`: number, parent and what changed, images used,
    runs, note, warnings."""
    made = "" if info.created_at is None else info.created_at.strftime("%Y-%m-%d %H:%M")
    changed = "imported" if info.parent is None else f"from {info.parent}: {info.edits.summary()}"
    runs = f"  runs {', '.join(str(r) for r in info.runs)}" if info.runs else ""
    note = f"  “{info.note}”" if info.note and info.parent is not None else ""
    warned = "".join(f"  ⚠ {warning}" for warning in info.warnings)
    return f"{info.version:>4}  {made:<16}  {changed:<40} {info.n_images:>7} images{runs}{note}{warned}"
