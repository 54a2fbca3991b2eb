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


def stratified(codes: Tensor, keep: Tensor, per_category: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Indices of at most `per_category` random entries of each category code 0, 1, … (long,
    (T,)), among the entries where `keep` (bool, (T,)) holds; by code, then in drawn order.
    Tensor work only: a FaceNet batch has O(B²) triplets."""
    if per_category < 0:
        raise ValueError(f"per_category must be >= 0, got {per_category}")
    codes, keep = codes.cpu(), keep.cpu()
    chosen = []
    for code in range(int(codes.max()) + 1 if len(codes) else 0):
        members = torch.nonzero(keep & (codes == code)).squeeze(1)
        draw = torch.randperm(len(members), generator=_cpu(generator))[:per_category]
        chosen.append(members[draw])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


def rows(anchor: Tensor, positive: Optional[Tensor], negative: Optional[Tensor], d_ap: Optional[Tensor],
         d_an: Optional[Tensor], category: Sequence[str], loss: Tensor, weight: Optional[Tensor] = None) -> list[dict]:
    """Row dicts from equal-length tensors; a member given as None is None in every row. A row
    with a non-finite distance, loss or weight is left out (JSON has no NaN)."""
    given = {"anchor": anchor, "positive": positive, "negative": negative, "d_ap": d_ap, "d_an": d_an,
             "loss": loss, "weight": weight}
    columns = {key: [None] * len(category) if t is None else
               (t.cpu().tolist() if key in ("anchor", "positive", "negative") else t.detach().double().cpu().tolist())
               for key, t in given.items()}
    out = [dict({key: column[i] for key, column in columns.items()}, category=name) for i, name in enumerate(category)]
    return [r for r in out if all(not isinstance(v, float) or math.isfinite(v) for v in r.values())]


def _cpu(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """A CPU generator seeded from `generator` (randperm of small CPU index lists needs one)."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)
