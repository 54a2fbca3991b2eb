"""What the triplet inspector shows of a batch: rows of the triplets or pairs the run's miner
returned and its loss used, each with its distances, category and the loss it contributed under
the run's own loss. Every loss builds its rows with `rows(...)`; `fit` calls `loss_fn.inspect`
on each epoch's last batch and stores them (storage.schema.TripletRow).

A row is a dict of batch rows (fit maps them to dataset positions): anchor, positive, negative
(None when a pair has no such member), d_ap, d_an (None likewise), category (a triplet category
or a PairKind), loss, weight (the softmax weight of the negative for InfoNCE and SupCon, else
None).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

ROWS_PER_CATEGORY = 8  # the inspector's bound: triplets (or pairs, or anchors) per category


def stratified(categories: Sequence[str], keep: Tensor, per_category: int, order: Sequence[str],
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Indices of at most `per_category` random entries of each category in `order`, among the
    entries where `keep` (bool, (T,)) holds; in `order`, then drawn order."""
    if per_category < 0:
        raise ValueError(f"per_category must be >= 0, got {per_category}")
    names = list(categories)
    kept = keep.cpu().tolist()
    chosen = []
    for name in order:
        members = torch.tensor([i for i, (c, k) in enumerate(zip(names, kept)) if k and c == name], dtype=torch.long)
        if len(members) == 0:
            continue
        draw = torch.randperm(len(members), generator=_cpu(generator))[:per_category]
        chosen.append(members[draw])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


def rows(anchor: Tensor, positive: Optional[Tensor], negative: Optional[Tensor], d_ap: Optional[Tensor],
         d_an: Optional[Tensor], category: Sequence[str], loss: Tensor, weight: Optional[Tensor] = None) -> list[dict]:
    """Row dicts from equal-length tensors; a member given as None is None in every row."""
    def values(tensor: Optional[Tensor], kind) -> list:
        if tensor is None:
            return [None] * len(anchor)
        return [kind(v) for v in tensor.detach().double().cpu().tolist()] if kind is float else \
            [int(v) for v in tensor.cpu().tolist()]

    columns = {"anchor": values(anchor, int), "positive": values(positive, int), "negative": values(negative, int),
               "d_ap": values(d_ap, float), "d_an": values(d_an, float), "loss": values(loss, float),
               "weight": values(weight, float)}
    out = []
    for i, name in enumerate(category):
        row = {key: column[i] for key, column in columns.items()}
        row["category"] = name
        out.append(row)
    return [r for r in out if all(v is None or not isinstance(v, float) or math.isfinite(v) for v in r.values())]


def _cpu(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """A CPU generator seeded from `generator` (randperm of small CPU index lists needs one)."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)
