"""The lab's own objectives (triplet, contrastive, InfoNCE, supervised contrastive) and miners.
Formulas as DESIGN.md defines them; the torch code is in core/losses and core/metric/miners.py."""
from __future__ import annotations

from core.metric.registry import MinedKind, Miner, Objective, Setting, register_miner, register_objective

DISTANCE = Setting("distance", "Distance", "euclidean", "on L2-normalised embeddings; cosine is 1 − cos",
                   choices=("euclidean", "cosine"))
TEMPERATURE = Setting("temperature", "Temperature τ", 0.1, "0.05 to 0.5 is usual", low=0.01, high=10.0, step=0.01)
TRIPLET_VARIANT = Setting(
    "triplet_variant", "Triplet variant", "standard", "which per-triplet loss",
    choices=("standard", "squared", "soft-margin"),
    choice_help={"standard": "max(0, d(A,P) − d(A,N) + m)", "squared": "max(0, d(A,P)² − d(A,N)² + m)",
                 "soft-margin": "ln(1 + e^{d(A,P) − d(A,N)}), no margin"})


def _margin(default: float, help: str) -> Setting:
    return Setting("margin", "Margin m", default, help, low=0.01, high=10.0, step=0.05)


def _check_triplet(values: dict) -> None:
    if values["triplet_variant"] == "squared" and values["distance"] != "euclidean":
        raise ValueError(f"the squared variant needs the euclidean distance, got {values['distance']!r}")


register_objective(Objective(
    name="triplet", title="Triplet",
    explanation="L = max(0, d(A,P) − d(A,N) + m): the negative must be at least m farther than the positive.",
    settings=(_margin(0.2, "how much farther than the positive a negative must be; also draws the categories"),
              DISTANCE, TRIPLET_VARIANT),
    accepts=(MinedKind.TRIPLET_SET, MinedKind.TRIPLETS), default_miner="semi-hard",
    factory="core.metric.losses.triplet:build", check=_check_triplet))

register_objective(Objective(
    name="contrastive", title="Contrastive (pairs)",
    explanation="L = (1 − Y)·D² + Y·max(0, m − D)², Y = 0 for a similar pair and 1 for a dissimilar one.",
    settings=(_margin(0.5, "dissimilar pairs closer than m are pushed apart; also draws the triplet categories"),
              DISTANCE),
    accepts=(MinedKind.PAIRS,), default_miner="all-pairs", factory="core.metric.losses.contrastive:build"))

register_objective(Objective(
    name="infonce", title="InfoNCE / NT-Xent",
    explanation="L = −ln(e^{s(x,x⁺)/τ} / Σ e^{s(x,x_i)/τ}): two augmented views of an image are the positive, "
    "the rest of the batch are negatives.",
    settings=(TEMPERATURE,), accepts=(MinedKind.IN_BATCH,), default_miner="in-batch",
    factory="core.metric.losses.infonce:build_infonce", self_supervised=True))

register_objective(Objective(
    name="supcon", title="Supervised contrastive",
    explanation="L = −1/|P(i)| Σ_{p∈P(i)} ln(e^{s(x_i,x_p)/τ} / Σ_{a≠i} e^{s(x_i,x_a)/τ}): every image of the "
    "same label is a positive.",
    settings=(TEMPERATURE,), accepts=(MinedKind.IN_BATCH,), default_miner="in-batch",
    factory="core.metric.losses.infonce:build_supcon"))

for name, title, explanation in (
    ("semi-hard", "Semi-hard", "every semi-hard triplet: d(A,P) < d(A,N) ≤ d(A,P) + m."),
    ("hard", "Hard", "every hard triplet: d(A,N) ≤ d(A,P)."),
    ("all", "All", "every triplet; the loss averages those with d(A,N) < d(A,P) + m (a non-zero loss)."),
    ("easy", "Easy", "every easy triplet: d(A,N) > d(A,P) + m (no signal; for inspection and comparison)."),
):
    register_miner(Miner(name, title, explanation, MinedKind.TRIPLET_SET, f"core.metric.miners:{name.replace('-', '_')}_triplets",
                         uses_margin=True))
register_miner(Miner("batch-hard", "Batch-hard", "per anchor, its farthest positive and its closest negative.",
                     MinedKind.TRIPLETS, "core.metric.miners:BatchHardMiner"))
register_miner(Miner("facenet", "FaceNet semi-hard", "per anchor-positive pair, the closest negative that is "
                     "farther than the positive and within m.", MinedKind.TRIPLETS, "core.metric.miners:FaceNetMiner",
                     uses_margin=True))
register_miner(Miner("all-pairs", "All pairs", "every similar pair and every dissimilar pair of the batch.",
                     MinedKind.PAIRS, "core.metric.miners:AllPairsMiner"))
register_miner(Miner("hard-pairs", "Hard pairs", "pairs that break the ordering: a similar pair farther than that "
                     "image's closest dissimilar one, a dissimilar pair closer than its farthest similar one.",
                     MinedKind.PAIRS, "core.metric.miners:HardPairsMiner"))
register_miner(Miner("in-batch", "In-batch negatives", "every other image of the batch is a candidate; the "
                     "softmax weighs the closest most.", MinedKind.IN_BATCH, "core.metric.miners:InBatchMiner"))
