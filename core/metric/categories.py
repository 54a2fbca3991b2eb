"""The names every part of the lab shares for what mining finds, defined here once and torch-free
(pages, the tally's files and the map read them): the triplet categories, the pair kinds, and the
columns of the per-image mining counts."""
from __future__ import annotations

from enum import Enum


class Category(str, Enum):
    """A triplet's category for margin m (DESIGN.md); the only spelling, in code and on screen."""

    EASY = "easy"  # d(A,N) > d(A,P) + m
    SEMI_HARD = "semi-hard"  # d(A,P) < d(A,N) <= d(A,P) + m
    HARD = "hard"  # d(A,N) <= d(A,P)


CATEGORIES = tuple(c.value for c in Category)


class PairKind(str, Enum):
    """A pair miner's rows: a similar pair (same label) or a dissimilar one (Y = 1)."""

    SIMILAR = "similar"
    DISSIMILAR = "dissimilar"


# What each image did in a batch's valid triplets (core.metric.mining.ImageCounts.per_image, the
# tally's stored columns, the map's colourings): triplets with it as a hard negative, as a
# semi-hard negative, and as an anchor whose margin was violated.
MINING_COLUMNS = ("hard_negative", "semi_hard_negative", "violated_anchor")
MINING_TITLES = {
    "hard_negative": "times used as a hard negative",
    "semi_hard_negative": "times used as a semi-hard negative",
    "violated_anchor": "times an anchor with its margin violated",
}  # one title per MINING_COLUMNS entry, as the pages show them
