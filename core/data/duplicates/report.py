"""The report of a finding: each member's name, label and split from the image table, the test
images with a training copy (leakage), the groups whose labels disagree, and which positions an
"Exclude duplicates" edit would remove."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from core.data.duplicates.finding import Finding
from core.data.duplicates.pixels import representatives


@dataclass(frozen=True)
class Member:
    """One image of a group: its position in the dataset, file name, label name (None when
    unlabeled), split, distance to the group's first member, and distance to its nearest other member."""

    position: int
    name: str
    label: Optional[str]
    split: str
    distance: float
    link: float


@dataclass(frozen=True)
class Group:
    """Exact copies (kind "exact", every distance 0) or near copies (kind "near") of one picture."""

    kind: str
    members: tuple[Member, ...]

    @property
    def positions(self) -> list[int]:
        return [member.position for member in self.members]

    @property
    def labels_disagree(self) -> bool:
        """Whether two members carry different labels (unlabeled members are left out)."""
        return len({member.label for member in self.members if member.label is not None}) > 1

    @property
    def spans_splits(self) -> bool:
        """Whether the group has members in both the training and the test split."""
        return {"train", "test"} <= {member.split for member in self.members}


@dataclass(frozen=True)
class DuplicateReport:
    """What `python -m core duplicates` prints and the Data page shows.

    leaked_test: positions of the test images within the threshold of a training image (an exact
    copy, or a near copy by the measure); retrieval metrics counted on them are inflated."""

    dataset_id: int
    dataset: str
    run_id: Optional[int]
    measure: str  # "pixels" or "embeddings"
    threshold: float
    n_images: int
    exact: tuple[Group, ...]
    near: tuple[Group, ...]
    leaked_test: tuple[int, ...]
    seconds: float  # what finding them took (when it was computed, not when it was read back)
    version: int = 1  # the dataset's version whose labels and exclusions the groups show
    excluded: int = 0  # images that version excludes, left out of every group

    @property
    def label_disagreements(self) -> tuple[Group, ...]:
        return tuple(group for group in self.exact + self.near if group.labels_disagree)

    def summary(self) -> dict:
        return {
            "dataset": self.dataset, "dataset_id": self.dataset_id, "version": self.version, "run_id": self.run_id,
            "measure": self.measure, "threshold": self.threshold, "images": self.n_images,
            "excluded_by_version": self.excluded,
            "exact_groups": len(self.exact), "exact_images": sum(len(g.members) for g in self.exact),
            "near_groups": len(self.near), "near_images": sum(len(g.members) for g in self.near),
            "test_images_with_training_copy": len(self.leaked_test),
            "label_disagreeing_groups": len(self.label_disagreements),
            "seconds": round(self.seconds, 3),
        }

    def to_dict(self) -> dict:
        """The summary, the groups and the leaked test positions, as JSON-ready values."""
        def group(g: Group) -> dict:
            return {"kind": g.kind, "labels_disagree": g.labels_disagree, "spans_splits": g.spans_splits,
                    "members": [{"position": m.position, "name": m.name, "label": m.label, "split": m.split,
                                 "distance": round(m.distance, 6), "link": round(m.link, 6)} for m in g.members]}

        return {**self.summary(), "exact": [group(g) for g in self.exact], "near": [group(g) for g in self.near],
                "leaked_test": list(self.leaked_test)}


def leaked_test(finding: Finding, split: np.ndarray, present: Optional[np.ndarray] = None) -> np.ndarray:
    """Positions of test images with a training image within the threshold. split: (N,) "train"/"test";
    present: (N,) bool, False for the images a version excludes (neither leaks nor leaked)."""
    n = finding.n_images
    present = np.ones(n, dtype=bool) if present is None else present
    owner = representatives(n, finding.exact)
    train = (split == "train") & present
    copies_train = np.zeros(n, dtype=bool)  # per representative: its exact copies include a training image
    np.logical_or.at(copies_train, owner, train)
    partner_train = np.zeros(n, dtype=bool)  # per representative: a near copy's copies do
    a, b = finding.pairs.a, finding.pairs.b
    partner_train[a[copies_train[b]]] = True
    partner_train[b[copies_train[a]]] = True
    return np.flatnonzero((split == "test") & present & (copies_train[owner] | partner_train[owner]))


def report(finding: Finding, dataset_id: int, dataset: str, names: Sequence[str], labels: Sequence[Optional[int]],
           split: Sequence[str], classes: Sequence[str], run_id: Optional[int] = None,
           excluded: Optional[Sequence[bool]] = None, version: int = 1) -> DuplicateReport:
    """The finding with each member's name, label name and split (the image table's, by position),
    as a version of the dataset holds them: its labels, and without the images it excludes (a
    group left with one member is no group; an excluded image is no leak and leaks nothing)."""
    if not len(names) == len(labels) == len(split) == finding.n_images:
        raise ValueError(f"the finding covers {finding.n_images} images but the dataset has {len(names)}")
    split = np.asarray(split)
    present = np.ones(finding.n_images, dtype=bool) if excluded is None else ~np.asarray(excluded, dtype=bool)
    if present.shape != (finding.n_images,):
        raise ValueError(f"the finding covers {finding.n_images} images but `excluded` has {present.shape[0]}")

    def member(position: int, distance: float, link: float) -> Member:
        label = labels[position]
        return Member(position, names[position], None if label is None else str(classes[label]), str(split[position]),
                      float(distance), float(link))

    def group(kind: str, members: list[Member]) -> Optional[Group]:
        kept = tuple(m for m in members if present[m.position])
        return Group(kind, kept) if len(kept) > 1 else None

    exact = [group("exact", [member(int(p), 0.0, 0.0) for p in g]) for g in finding.exact]
    near = [group("near", [member(int(p), d, l) for p, d, l in zip(g, distance, link)])
            for g, distance, link in zip(finding.near, finding.distance, finding.link)]
    return DuplicateReport(dataset_id, dataset, run_id, finding.measure, finding.threshold, finding.n_images,
                           tuple(g for g in exact if g), tuple(g for g in near if g),
                           tuple(int(p) for p in leaked_test(finding, split, present)), finding.seconds, version,
                           int((~present).sum()))


EXCLUSIONS = {
    "copies": "every member of each group but its first (the lowest position): one image of each picture is kept",
    "leaks": "the test images with a copy in the training split",
}


def positions_to_exclude(found: DuplicateReport, what: str = "copies") -> list[int]:
    """The image positions an "Exclude duplicates" edit would remove (sorted): see EXCLUSIONS.
    A near group contains its exact copies, so "copies" reads the groups that overlap as one."""
    if what not in EXCLUSIONS:
        raise ValueError(f"unknown exclusion {what!r}; choose one of: {', '.join(EXCLUSIONS)}")
    if what == "leaks":
        return sorted(found.leaked_test)
    in_near = {p for group in found.near for p in group.positions}
    keep_first = [group.positions for group in found.near]
    keep_first += [group.positions for group in found.exact if group.positions[0] not in in_near]
    return sorted(p for positions in keep_first for p in positions[1:])
