"""Triplet mining from a B×B distance matrix, without ever listing the B³ triplets.

Categories for margin m (DESIGN.md, seed 004), for a valid triplet (a, p, n) with a != p,
label[a] == label[p] and label[n] != label[a]:

- easy:      d(a,n) >  d(a,p) + m
- semi-hard: d(a,p) <  d(a,n) <= d(a,p) + m
- hard:      d(a,n) <= d(a,p)

Method: each anchor's negative distances are sorted once (B×B). For a pair (a, p) the negatives
of one category are then a contiguous range of a's sorted row, whose ends `torch.searchsorted`
finds for all pairs at once. Once the ranges are known, the mean triplet loss over them is linear
in the distances: each d_ap weighs the size of its range, each d_an minus the number of ranges
that hold it (a running sum of +1 and -1 at the range ends), so the loss is sum(weight * dist) + m
and its gradient is the weight matrix. Counts, samples and the loss over a whole category cost
O(B² log B) time and O(B²) memory; a B×B×B tensor (34 GB of floats at B = 2048) is never built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from core.metric.categories import CATEGORIES, MINING_COLUMNS, Category

TRIPLET_KINDS = ("semi-hard", "hard", "all", "easy")  # the triplet sets a category miner returns

@dataclass
class TripletCounts:
    """How many valid triplets of a batch fall in each category."""

    easy: int
    semi_hard: int
    hard: int
    # of these, the triplets whose negative came from a cross-batch memory (an earlier batch), for a
    # batch mined against one (MiningBatch.from_memory); None otherwise
    from_memory: Optional["TripletCounts"] = None

    @property
    def total(self) -> int:
        return self.easy + self.semi_hard + self.hard

    def as_dict(self) -> dict[str, int]:
        """Keyed by the categories' one spelling (core.metric.categories.Category)."""
        return {Category.EASY.value: self.easy, Category.SEMI_HARD.value: self.semi_hard, Category.HARD.value: self.hard}


@dataclass
class Triplets:
    """A set of triplets as the inspector shows them. All fields have length T."""

    anchor: Tensor  # (T,) long
    positive: Tensor  # (T,) long
    negative: Tensor  # (T,) long
    d_ap: Tensor  # (T,) distance anchor-positive, detached
    d_an: Tensor  # (T,) distance anchor-negative, detached
    category: list[str]  # each one of CATEGORIES; [] when not named (miners leave it to the inspector)

    def __len__(self) -> int:
        return len(self.anchor)


@dataclass
class _SortedNegatives:
    """Each anchor's negatives sorted by distance. Tensors are (B, B) unless noted."""

    values: Tensor  # sorted distances, +inf past the last negative
    order: Tensor  # column (negative index) of each sorted value
    count: Tensor  # (B,) number of negatives of each anchor
    positive: Tensor  # bool, a != p and same label
    # _pair_rank's answers for this batch, by (columns, shift, inclusive): the miner's ranges, the
    # loss's nonzero() and the tally's categories ask for the same three searches
    ranks: dict = field(default_factory=dict)


def _check_inputs(dist: Tensor, labels: Tensor, margin: float, ref_labels: Optional[Tensor] = None,
                  own: Optional[Tensor] = None) -> None:
    if ref_labels is None:
        if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
            raise ValueError(f"dist must be a square (B, B) matrix, got shape {tuple(dist.shape)}")
    else:
        if dist.dim() != 2 or ref_labels.shape != (dist.shape[1],):
            raise ValueError(f"dist must be (B, R) and ref_labels (R,), got {tuple(dist.shape)}, "
                             f"{tuple(ref_labels.shape)}")
        if own is None or own.shape != (dist.shape[0],):
            raise ValueError(f"own must have shape ({dist.shape[0]},): each query's own column (-1: none)")
    if labels.shape != (dist.shape[0],):
        raise ValueError(f"labels must have shape ({dist.shape[0]},), got {tuple(labels.shape)}")
    if margin < 0:
        # With m < 0 the categories overlap and stop being a partition.
        raise ValueError(f"margin must be >= 0, got {margin}")


def _sort_negatives(dist: Tensor, labels: Tensor, ref_labels: Optional[Tensor] = None,
                    own: Optional[Tensor] = None) -> _SortedNegatives:
    if ref_labels is None:
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    else:  # queries against references: a query's own copy (column own[a]) is not its positive
        same = labels[:, None] == ref_labels[None, :]
        eye = _own_mask(own, dist.shape[1])
    # +inf sends non-negatives to the end of each row, after every finite query.
    values, order = sort_rows(dist.detach().masked_fill(same, float("inf")))
    return _SortedNegatives(values, order, (~same).sum(dim=1), same & ~eye)


def sort_rows(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """(values, order) of each row sorted ascending, as `matrix.sort(dim=1)`; ties in column order.

    A float32 matrix on the CPU is sorted as one int64 key per entry (the value's bits, made
    monotonic, above its column) by numpy's sort, which needs no index array: at a training
    batch of 256 that took 0.2 ms against torch.sort's 1.2 ms on 2 cores (2.5 ms on one), the
    largest share of a step's mining. Anything else goes to torch.sort."""
    if matrix.device.type != "cpu" or matrix.dtype != torch.float32 or matrix.dim() != 2 or matrix.numel() == 0:
        return matrix.sort(dim=1)
    bits = matrix.contiguous().numpy().view(np.int32).astype(np.int64)
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negative floats' bits count down: flip them to count up
    keys = (bits << 32) | np.arange(matrix.shape[1], dtype=np.int64)
    keys.sort(axis=1)
    high = keys >> 32
    high ^= (high >> 31) & 0x7FFFFFFF
    values = torch.from_numpy(high.astype(np.int32).view(np.float32))
    return values, torch.from_numpy(keys & 0xFFFFFFFF)


def _rank(negatives: _SortedNegatives, d_ap: Tensor, shift: float, inclusive: bool) -> Tensor:
    """For every anchor a (row) and distance d_ap in its row of `d_ap` ((B, B) or (B, P)): how
    many of a's negatives have d_an <= d_ap + shift (inclusive) or d_an < d_ap + shift.
    Same shape, long; one batched binary search, the costly step here."""
    with torch.no_grad():
        rows = negatives.values.detach().contiguous()
        # The sorted values are entries of `dist` itself, so ties compare exactly as in a loop.
        queries = d_ap.detach() + shift if shift else d_ap.detach()
        return torch.searchsorted(rows, queries.contiguous(), right=inclusive)


def _pair_rank(negatives: _SortedNegatives, dist: Tensor, columns: Tensor, shift: float, inclusive: bool) -> Tensor:
    """_rank of the (B, P) anchor-positive distances dist.gather(1, columns), searched once per
    batch: kept on `negatives` (a batch's one sort), whose columns are the batch's positive table."""
    key = (id(columns), float(shift), bool(inclusive))
    found = negatives.ranks.get(key)
    if found is None:
        found = negatives.ranks[key] = _rank(negatives, dist.gather(1, columns), shift, inclusive)
    return found


def _own_mask(own: Tensor, references: int) -> Tensor:
    """(B, R) bool: True at each query's own column own[a] (none where own[a] < 0)."""
    mask = torch.zeros(len(own), references + 1, dtype=torch.bool, device=own.device)
    mask[torch.arange(len(own), device=own.device), torch.where(own < 0, references, own)] = True
    return mask[:, :references]


def _cross_positive_table(labels: Tensor, ref_labels: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
    """_positive_table of queries against references: each query's positives are the references
    of its label less its own column, packed to the left: columns (B, P) long, valid (B, P) bool.
    From one sort of the reference labels, O(R log R + B log R + BP)."""
    device = labels.device
    order = ref_labels.argsort(stable=True)
    grouped = ref_labels[order]
    start = torch.searchsorted(grouped, labels, right=False)
    count = torch.searchsorted(grouped, labels, right=True) - start
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=device)
    has_own = own >= 0
    own_at = torch.where(has_own, position[own.clamp_min(0)] - start, count)  # past the group: none to skip
    size = count - has_own.long()
    widest = int(size.max()) if len(size) else 0
    slot = torch.arange(widest, device=device)[None, :]
    offset = slot + (slot >= own_at[:, None]).long()
    valid = slot < size[:, None]
    columns = order[(start[:, None] + offset).clamp(0, max(len(order) - 1, 0))] if len(order) else \
        torch.zeros(len(labels), widest, dtype=torch.long, device=device)
    return columns, valid


def _positive_table(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each anchor's positives packed to the left: columns (B, P) long and valid (B, P) bool,
    P the largest number of positives of an anchor. From one sort of the labels, O(B log B + BP):
    the positives of a are its label's group in label order, less a itself."""
    size = len(labels)
    order = labels.argsort(stable=True)
    grouped = labels[order]
    starts_group = torch.ones(size, dtype=torch.bool, device=labels.device)
    starts_group[1:] = grouped[1:] != grouped[:-1]
    group_of_position = starts_group.cumsum(0) - 1
    group_start = torch.nonzero(starts_group).squeeze(1)
    group_size = torch.diff(group_start, append=torch.tensor([size], device=labels.device))
    position = torch.empty_like(order)
    position[order] = torch.arange(size, device=labels.device)
    group = group_of_position[position]  # (B,) group of each anchor
    start, count = group_start[group], group_size[group]
    widest = int(group_size.max()) - 1 if size else 0
    slot = torch.arange(widest, device=labels.device)[None, :]
    offset = slot + (slot >= (position - start)[:, None]).long()  # step over the anchor itself
    valid = offset < count[:, None]
    columns = order[(start[:, None] + offset).clamp_max(max(size - 1, 0))]
    return columns, valid


class MiningBatch:
    """One batch as every reader of its mining sees it: the (B, B) distances (detached), the
    labels and the margin that draws the categories, with each anchor's negatives sorted by
    distance and the anchors' positive table computed on first use, once. The miner, the loss's
    ranges, the per-image tally, the step's category counts and the inspector all read one
    MiningBatch, so a training step sorts its distance matrix once.

    dist: (B, B) as the loss compares them; labels: (B,) long; margin >= 0.

    Against references (a cross-batch memory, core.metric.memory): dist (B, R) from the B
    queries (the batch's rows, the anchors) to R references (the memory, which holds the batch's
    own copies too), ref_labels (R,) and own (B,) long, the column of each query's own copy
    (-1: none), which is never its positive. Positives and negatives are then reference
    columns; everything else reads the same. The square batch is the case ref_labels=None
    (references = queries, own = the diagonal) and takes its own, unchanged code path.
    from_memory (R,) bool: the references an earlier batch wrote (the memory's own negatives, as
    the counts and the inspector show them), against references only."""

    def __init__(self, dist: Tensor, labels: Tensor, margin: float, ref_labels: Optional[Tensor] = None,
                 own: Optional[Tensor] = None, from_memory: Optional[Tensor] = None) -> None:
        _check_inputs(dist, labels, margin, ref_labels, own)
        self.dist = dist.detach()
        self.labels = labels
        self.margin = float(margin)
        self.ref_labels = labels if ref_labels is None else ref_labels
        self.own = own
        self.square = ref_labels is None
        if from_memory is not None and (self.square or from_memory.shape != (dist.shape[1],)):
            raise ValueError(f"from_memory must be ({dist.shape[1]},) bool, and given with references only")
        self.from_memory = from_memory
        self._negatives: Optional[_SortedNegatives] = None
        self._positives: Optional[tuple[Tensor, Tensor]] = None
        self._every: Optional[TripletSet] = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def negatives(self) -> _SortedNegatives:
        """Each anchor's negatives sorted by distance (the one sort of the batch)."""
        if self._negatives is None:
            with torch.no_grad():
                self._negatives = _sort_negatives(self.dist, self.labels, None if self.square else self.ref_labels,
                                                  self.own)
        return self._negatives

    @property
    def positive_table(self) -> tuple[Tensor, Tensor]:
        """Each anchor's positives packed to the left: (columns, valid), both (B, P)."""
        if self._positives is None:
            self._positives = (_positive_table(self.labels) if self.square
                               else _cross_positive_table(self.labels, self.ref_labels, self.own))
        return self._positives

    @torch.no_grad()
    def triplet_set(self, kind: str, margin: Optional[float] = None) -> "TripletSet":
        """Every triplet of `kind` (TRIPLET_KINDS) for `margin` (the batch's when None), as ranges
        of the sorted negatives. O(B² log B) time past the sort, O(B²) memory."""
        if kind not in TRIPLET_KINDS:
            raise ValueError(f"kind must be one of {', '.join(TRIPLET_KINDS)}; got {kind!r}")
        margin = self.margin if margin is None else margin
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        negatives = self.negatives
        # Only the (B, P) anchor-positive pairs are searched, not all B² pairs: P is about B / 10
        # with 10 classes and K - 1 with P×K batches.
        columns, valid = self.positive_table
        count = negatives.count[:, None].expand(columns.shape)
        rank = lambda shift: _pair_rank(negatives, self.dist, columns, shift, inclusive=True)  # noqa: E731
        if kind == "all":
            start, end = torch.zeros_like(count), count
        elif kind == "hard":
            start, end = torch.zeros_like(count), rank(0.0)
        elif kind == "semi-hard":
            start, end = rank(0.0), rank(margin)
        else:
            start, end = rank(margin), count
        return TripletSet(kind, margin, self.dist, negatives, columns, valid, start, end)

    def every(self) -> "TripletSet":
        """Every valid triplet at the batch's margin (kept: the tally and the counts share it)."""
        if self._every is None:
            self._every = self.triplet_set("all")
        return self._every

    @torch.no_grad()
    def counts(self) -> "TripletCounts":
        """How many of the batch's valid triplets fall in each category."""
        every = self.every()
        return every.category_counts(every.category_ranges())


@torch.no_grad()
def count_triplets(dist: Tensor, labels: Tensor, margin: float) -> TripletCounts:
    """Count valid triplets per category. dist: (B, B), labels: (B,) long, margin >= 0."""
    return MiningBatch(dist, labels, margin).counts()


def category_codes(d_ap: Tensor, d_an: Tensor, margin: float) -> Tensor:
    """Each triplet's category as an index into CATEGORIES (long), from its distances, compared
    as the ranges compare them."""
    codes = torch.full_like(d_ap, CATEGORIES.index(Category.EASY.value), dtype=torch.long)
    codes[d_an <= d_ap + margin] = CATEGORIES.index(Category.SEMI_HARD.value)
    codes[d_an <= d_ap] = CATEGORIES.index(Category.HARD.value)
    return codes


def categorize(d_ap: Tensor, d_an: Tensor, margin: float) -> list[str]:
    """The category name of each triplet (see category_codes)."""
    return [CATEGORIES[code] for code in category_codes(d_ap, d_an, margin).tolist()]


@dataclass
class TripletSet:
    """Every triplet of one kind in a batch, without listing them: for anchor a and its j-th
    positive `columns[a, j]` (where `valid[a, j]`), the negatives `negatives.order[a, start:end]`
    of a's row sorted by distance, with (start, end) = (start[a, j], end[a, j]). All (B, P).

    kind: "semi-hard", "hard", "easy" or "all" (TRIPLET_KINDS). `nonzero()` narrows the set to
    the triplets whose loss max(0, d_ap − d_an + m) is not zero: the set the standard triplet
    loss averages over. Sizes, samples and the loss's weights cost O(B² log B); `indices()`
    lists the triplets and is for small batches (tests)."""

    kind: str
    margin: float
    dist: Tensor  # (B, B), detached
    negatives: _SortedNegatives
    columns: Tensor
    valid: Tensor
    start: Tensor
    end: Tensor

    def sizes(self) -> Tensor:
        """(B, P) long: how many triplets each (a, j) pair has."""
        return torch.where(self.valid, (self.end - self.start).clamp_min(0), 0)

    def __len__(self) -> int:
        return int(self.sizes().sum())

    def nonzero(self) -> "TripletSet":
        """The triplets of this set with d_an < d_ap + m (a non-zero standard triplet loss)."""
        below_margin = _pair_rank(self.negatives, self.dist, self.columns, self.margin, inclusive=False)
        return TripletSet(self.kind, self.margin, self.dist, self.negatives, self.columns, self.valid,
                          self.start, torch.minimum(self.end, below_margin).clamp_min(self.start))

    def category_ranges(self) -> dict[str, tuple[Tensor, Tensor]]:
        """For each category, the part of each (a, j) range that holds it: (start, end), (B, P)."""
        up_to_ap = _pair_rank(self.negatives, self.dist, self.columns, 0.0, inclusive=True)
        up_to_margin = _pair_rank(self.negatives, self.dist, self.columns, self.margin, inclusive=True)
        bounds = {Category.HARD.value: (torch.zeros_like(up_to_ap), up_to_ap),
                  Category.SEMI_HARD.value: (up_to_ap, up_to_margin),
                  Category.EASY.value: (up_to_margin, self.negatives.count[:, None].expand_as(up_to_ap))}
        return {name: (torch.maximum(self.start, low), torch.minimum(self.end, high).clamp_min(torch.maximum(self.start, low)))
                for name, (low, high) in bounds.items()}

    def category_counts(self, ranges: dict[str, tuple[Tensor, Tensor]]) -> TripletCounts:
        """How many triplets of this set fall in each category, from `category_ranges()`."""
        size = {name: int(torch.where(self.valid, end - start, 0).sum()) for name, (start, end) in ranges.items()}
        return TripletCounts(easy=size[Category.EASY.value], semi_hard=size[Category.SEMI_HARD.value],
                             hard=size[Category.HARD.value])

    def indices(self) -> tuple[Tensor, Tensor, Tensor]:
        """(a, p, n) of every triplet, each (T,) long. Lists them: small batches only."""
        a, j = torch.nonzero(self.sizes() > 0, as_tuple=True)
        anchors, positives, negatives = [], [], []
        for anchor, slot in zip(a.tolist(), j.tolist()):
            for k in range(int(self.start[anchor, slot]), int(self.end[anchor, slot])):
                anchors.append(anchor)
                positives.append(int(self.columns[anchor, slot]))
                negatives.append(int(self.negatives.order[anchor, k]))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.dist.device)  # noqa: E731
        return as_tensor(anchors), as_tensor(positives), as_tensor(negatives)

    def sample(self, per_category: int, generator: torch.Generator | None = None) -> Triplets:
        """Up to `per_category` random triplets of this set in each category, in CATEGORIES order:
        distinct (a, p) pairs whose part of the category is non-empty, then one negative uniformly
        inside it."""
        if per_category < 0:
            raise ValueError(f"per_category must be >= 0, got {per_category}")
        device = self.dist.device
        draw_device = generator.device if generator is not None else device
        ranges = self.category_ranges()
        anchors, positives, negs, names = [], [], [], []
        for name in CATEGORIES:
            start, end = ranges[name]
            size = torch.where(self.valid, end - start, 0)
            a, j = torch.nonzero(size > 0, as_tuple=True)
            k = min(per_category, len(a))
            pick = torch.randperm(len(a), generator=generator, device=draw_device)[:k].to(device)
            a, j = a[pick], j[pick]
            uniform = torch.rand(k, generator=generator, device=draw_device).to(device)
            offset = (uniform * size[a, j]).long().clamp_max(size[a, j] - 1)
            negs.append(self.negatives.order[a, start[a, j] + offset])
            anchors.append(a)
            positives.append(self.columns[a, j])
            names += [name] * k
        a, p, n = torch.cat(anchors), torch.cat(positives), torch.cat(negs)
        return Triplets(a, p, n, self.dist[a, p], self.dist[a, n], names)


def triplet_set(dist: Tensor, labels: Tensor, margin: float, kind: str) -> TripletSet:
    """Every triplet of `kind` (TRIPLET_KINDS) in the batch as ranges of sorted negatives (see
    MiningBatch.triplet_set). dist: (B, B); labels: (B,) long; margin >= 0."""
    return MiningBatch(dist, labels, margin).triplet_set(kind)


@torch.no_grad()
def sample_triplets(
    dist: Tensor,
    labels: Tensor,
    margin: float,
    per_category: int,
    generator: torch.Generator | None = None,
) -> Triplets:
    """Up to `per_category` random triplets of each category among all the batch's triplets,
    in the order of CATEGORIES (see TripletSet.sample). dist: (B, B); labels: (B,) long."""
    return MiningBatch(dist, labels, margin).every().sample(per_category, generator)


def range_triplet_loss(dist: Tensor, labels: Tensor, margin: float, kind: str) -> tuple[Tensor, int]:
    """Mean of max(0, d_ap - d_an + m) over the non-zero losses of a whole triplet set.

    kind: "semi-hard", "hard", "all" (every valid triplet) or "easy" (every loss is 0, so the
    result is always a zero with a gradient). Equals pytorch-metric-learning's
    TripletMarginMiner(margin, type_of_triplets=kind) followed by TripletMarginLoss(margin) with
    its AvgNonZeroReducer, without listing the triplets. dist: (B, B), differentiable; labels:
    (B,) long. Returns (scalar loss, number of non-zero triplets); the loss is a zero with a
    gradient path when there is none.
    """
    return set_triplet_loss(dist, triplet_set(dist, labels, margin, kind))


def set_triplet_loss(dist: Tensor, mined: TripletSet) -> tuple[Tensor, int]:
    """Mean of max(0, d_ap - d_an + m) over the triplets of `mined` whose loss is not zero, and
    their number. dist: the differentiable (B, B) matrix `mined` was drawn from."""
    if mined.kind == "easy":
        # d_an > d_ap + m makes every loss max(0, d_ap - d_an + m) = 0: nothing to weigh.
        return dist.sum() * 0, 0
    with torch.no_grad():
        # Inside a range every loss is positive, so the mean of (d_ap - d_an + m) needs no relu
        # and is linear in dist: sum(weight * dist) + m, and its gradient is the weight matrix.
        used = mined.nonzero()
        count = used.sizes()
        total = int(count.sum())
    if total == 0:
        return dist.sum() * 0, 0
    with torch.no_grad():
        weight = _triplet_weights(used.negatives.order, used.columns, used.start, used.end, count).div_(total)
    loss = torch.dot(weight.flatten(), dist.to(weight.dtype).flatten()) + mined.margin
    return loss.to(dist.dtype), total


def _triplet_weights(order: Tensor, columns: Tensor, start: Tensor, end: Tensor, count: Tensor) -> Tensor:
    """(B, B) weight w with sum over the chosen triplets of (d_ap - d_an) = sum(w * dist):
    +count(a, p) at each positive, minus the number of a's ranges that hold n at each negative.
    order: (B, R) column of each sorted negative (R = B in a square batch); columns, start, end,
    count: (B, P)."""
    size, references = order.shape
    # float64 keeps every count exact and the weighted sum precise (MPS has no float64).
    dtype = torch.float32 if order.device.type == "mps" else torch.float64
    weight = torch.zeros(size, references, dtype=dtype, device=order.device)
    weight.scatter_add_(1, columns, count.to(dtype))
    # +1 where a range starts and -1 where it ends; a running sum counts the ranges over each
    # sorted position.
    in_use = (count > 0).to(dtype)
    edges = torch.zeros(size, references + 1, dtype=dtype, device=order.device)
    edges.scatter_add_(1, start, in_use).scatter_add_(1, end, -in_use)
    ranges_holding = edges.cumsum_(dim=1)[:, :references]
    return weight.scatter_add_(1, order, ranges_holding.neg_())


@torch.no_grad()
def batch_hard_triplets(dist: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor, its farthest positive and closest negative. Returns (a, p, n), each (T,) long,
    T <= B; anchors without a positive or without a negative are skipped."""
    _check_inputs(dist, labels, 0.0)
    if len(labels) == 0:  # argmax over an empty row is an error, not an empty answer
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return empty, empty, empty
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    farthest_positive = dist.masked_fill(~positive, float("-inf")).argmax(dim=1)
    closest_negative = dist.masked_fill(same, float("inf")).argmin(dim=1)
    anchor = torch.nonzero(positive.any(dim=1) & (~same).any(dim=1), as_tuple=True)[0]
    return anchor, farthest_positive[anchor], closest_negative[anchor]


@torch.no_grad()
def semi_hard_facenet_triplets(
    dist: Tensor, labels: Tensor, margin: float
) -> tuple[Tensor, Tensor, Tensor]:
    """FaceNet semi-hard mining: per (a, p) pair, the closest negative with
    d_ap < d_an <= d_ap + m; pairs with none are skipped. Returns (a, p, n), each (T,) long,
    T <= B²."""
    return facenet_triplets(MiningBatch(dist, labels, margin), margin)


@torch.no_grad()
def facenet_triplets(batch: MiningBatch, margin: float) -> tuple[Tensor, Tensor, Tensor]:
    """semi_hard_facenet_triplets on a MiningBatch's sorted negatives."""
    negatives = batch.negatives
    up_to_ap = _rank(negatives, batch.dist, 0.0, inclusive=True)
    up_to_margin = _rank(negatives, batch.dist, margin, inclusive=True)
    keep = negatives.positive & (up_to_margin > up_to_ap)
    anchor, positive = torch.nonzero(keep, as_tuple=True)
    # The first negative past d_ap in the sorted row is the closest semi-hard one.
    negative = negatives.order[anchor, up_to_ap[anchor, positive]]
    return anchor, positive, negative


# ---------------------------------------------------------------- per-image mining counts

@dataclass
class ImageCounts:
    """What each image of a batch did in the batch's valid triplets, all of them (not only a
    miner's picks), and the batch's category totals from the same ranges.

    per_image (B, 3) long, columns MINING_COLUMNS: triplets with the image as a hard negative,
    as a semi-hard negative, and as an anchor whose margin was violated (d_an < d_ap + m, a
    non-zero loss). Each triplet has one negative, so per_image[:, 0].sum() == batch.hard and
    per_image[:, 1].sum() == batch.semi_hard.
    negative_uses (B, B) long, only when asked for: [a, n] = triplets with anchor a and negative
    n that are hard or semi-hard.
    Against references (a cross-batch memory): per_image holds only the anchor column (the
    queries'), per_reference (R, 3) the negative columns of each reference (its anchor column
    0), and negative_uses is (B, R).
    """

    per_image: Tensor
    batch: TripletCounts
    negative_uses: Optional[Tensor] = None
    per_reference: Optional[Tensor] = None


@torch.no_grad()
def image_mining_counts(dist: Tensor, labels: Tensor, margin: float, negative_uses: bool = False) -> ImageCounts:
    """Per-image counts of a batch (see ImageCounts). dist: (B, B); labels: (B,) long; margin >= 0."""
    return batch_image_counts(MiningBatch(dist, labels, margin), negative_uses)


@torch.no_grad()
def batch_image_counts(batch: MiningBatch, negative_uses: bool = False) -> ImageCounts:
    """Per-image counts of a MiningBatch at its margin (see ImageCounts), from its sorted negatives.

    The ranges are range_triplet_loss's: per (a, p) the hard negatives are a's sorted row up to
    d_ap, the semi-hard ones from there up to d_ap + m. How many ranges hold each sorted position
    is a running sum of +1/-1 at the range ends (as in _triplet_weights); scattered back to the
    negatives' columns and summed over anchors it is each image's use as a negative. O(B² log B)
    time, O(B²) memory, no B×B×B tensor.
    """
    size, references = batch.dist.shape
    device = batch.dist.device
    if size == 0:
        empty = torch.zeros(0, len(MINING_COLUMNS), dtype=torch.long, device=device)
        return ImageCounts(empty, TripletCounts(0, 0, 0),
                           torch.zeros(0, references, dtype=torch.long, device=device) if negative_uses else None,
                           None if batch.square else torch.zeros(references, len(MINING_COLUMNS), dtype=torch.long,
                                                                 device=device))
    every = batch.every()
    ranges = every.category_ranges()
    valid, negatives = every.valid, every.negatives
    counts = every.category_counts(ranges)
    hard = _ranges_holding(*ranges[Category.HARD.value], valid, references)
    semi_hard = _ranges_holding(*ranges[Category.SEMI_HARD.value], valid, references)
    below_margin = every.nonzero().end  # violated: d_an < d_ap + m
    order = negatives.order.flatten()
    per_image = torch.zeros(size, len(MINING_COLUMNS), dtype=torch.long, device=device)
    as_negative = per_image if batch.square else torch.zeros(references, len(MINING_COLUMNS), dtype=torch.long,
                                                             device=device)
    as_negative[:, 0].scatter_add_(0, order, hard.flatten())
    as_negative[:, 1].scatter_add_(0, order, semi_hard.flatten())
    per_image[:, 2] = torch.where(valid, below_margin, 0).sum(dim=1)
    if batch.from_memory is not None:  # the same ranges, over the negatives an earlier batch wrote
        remembered = batch.from_memory[negatives.order].long()  # (B, R) in each anchor's sorted order
        easy = _ranges_holding(*ranges[Category.EASY.value], valid, references)
        counts.from_memory = TripletCounts(easy=int((easy * remembered).sum()),
                                           semi_hard=int((semi_hard * remembered).sum()),
                                           hard=int((hard * remembered).sum()))
    uses = None
    if negative_uses:  # each row of `order` is a permutation of the columns
        uses = torch.zeros(size, references, dtype=torch.long, device=device).scatter_(1, negatives.order,
                                                                                     hard + semi_hard)
    return ImageCounts(per_image, counts, uses, None if batch.square else as_negative)


def _ranges_holding(start: Tensor, end: Tensor, valid: Tensor, references: int) -> Tensor:
    """(B, R) long: for each anchor's sorted position j, how many of its (B, P) ranges
    [start, end) hold j (only the valid pairs' ranges)."""
    size = len(start)
    in_use = (valid & (end > start)).long()
    edges = torch.zeros(size, references + 1, dtype=torch.long, device=start.device)
    edges.scatter_add_(1, start, in_use).scatter_add_(1, end, -in_use)
    return edges.cumsum_(dim=1)[:, :references]
