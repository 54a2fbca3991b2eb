"""The built-in objectives and miners as registry entries, without torch: their settings, checks
and explanations here, their factories named "module:attribute" (core.metric.losses.*,
core.metric.miners) and imported on the first build (registry.resolve).

Reading the registry (RunConfig's checks, the command line's options, the Train page's widgets)
imports this module only, so `python -m core` parses its arguments and refuses a user's mistake
without importing torch (3.7 s a call before on the 2-core machine, 2 s of it torch). An added
objective or miner (core/metric/objectives/, README "Adding an objective or a miner") still
registers beside its nn.Module, torch and all: the registry imports those modules on first use
as before. tests/test_registry.py checks that each factory named here resolves and builds.
"""
from __future__ import annotations

from core.metric.registry import MinedKind, Miner, Objective, Setting, register_miner, register_objective

# the distances a loss compares embeddings with (core.metric.distances computes them)
DISTANCES = ("euclidean", "cosine")
DISTANCE = Setting("distance", "Distance", "euclidean", "on L2-normalised embeddings; cosine is 1 − cos",
                   choices=DISTANCES)
TRIPLET_VARIANTS = ("standard", "squared", "soft-margin")
TRIPLET_VARIANT = Setting(
    "triplet_variant", "Triplet variant", "standard", "which per-triplet loss",
    choices=TRIPLET_VARIANTS,
    choice_help={"standard": "max(0, d(A,P) − d(A,N) + m)", "squared": "max(0, d(A,P)² − d(A,N)² + m)",
                 "soft-margin": "ln(1 + e^{d(A,P) − d(A,N)}), no margin"})
# The cross-batch memory (core.metric.memory) of every triplet and pair miner: one setting, so one
# --memory-size option and one widget; 0 (the default) mines the batch alone, as before.
MEMORY_SIZE = Setting(
    "memory_size", "Cross-batch memory M", 0.0,
    "mine against the last M embeddings too (Wang et al. 2020), not only the batch; 0: off. "
    "At least the batch size when on", low=0.0, high=65536.0, step=256.0, omit_default=True)


def margin_setting(default: float, help: str) -> Setting:
    """An objective's margin m, with its default and what it does there."""
    return Setting("margin", "Margin m", default, help, low=0.01, high=10.0, step=0.05)


def temperature_setting(default: float) -> Setting:
    """An objective's softmax temperature τ, with its default."""
    return Setting("temperature", "Temperature τ", default, "0.05 to 0.5 is usual", low=0.01, high=10.0, step=0.01)


# SupCon's default τ is 0.07 (Khosla et al.'s), the τ of the default recipe's measured runs on Fashion-MNIST
# (bench/quality.py's docstring); InfoNCE keeps SimCLR's 0.1
SUPCON_TEMPERATURE = 0.07


def _check_triplet(values: dict) -> None:
    if values["triplet_variant"] == "squared" and values["distance"] != "euclidean":
        raise ValueError(f"the squared variant needs the euclidean distance, got {values['distance']!r}")


LOSSES = "core.metric.losses"
MINERS = "core.metric.miners"

register_objective(Objective(
    name="triplet", title="Triplet",
    explanation="L = max(0, d(A,P) − d(A,N) + m): the negative must be at least m farther than the positive.",
    settings=(margin_setting(0.2, "how much farther than the positive a negative must be; also draws the categories"),
              DISTANCE, TRIPLET_VARIANT),
    accepts=(MinedKind.TRIPLET_SET, MinedKind.TRIPLETS), default_miner="semi-hard",
    factory=f"{LOSSES}.triplet:build", check=_check_triplet))

register_objective(Objective(
    name="contrastive", title="Contrastive (pairs)",
    explanation="L = (1 − Y)·D² + Y·max(0, m − D)², Y = 0 for a similar pair and 1 for a dissimilar one.",
    settings=(margin_setting(0.5, "dissimilar pairs closer than m are pushed apart; also draws the triplet categories"),
              DISTANCE),
    accepts=(MinedKind.PAIRS,), default_miner="all-pairs", factory=f"{LOSSES}.contrastive:build"))

register_objective(Objective(
    name="infonce", title="InfoNCE / NT-Xent",
    explanation="L = −ln(e^{s(x,x⁺)/τ} / Σ e^{s(x,x_i)/τ}): two augmented views of an image are the positive, "
    "the rest of the batch are negatives.",
    settings=(temperature_setting(0.1),), accepts=(MinedKind.IN_BATCH,), default_miner="in-batch",
    factory=f"{LOSSES}.infonce:build_infonce", self_supervised=True))

register_objective(Objective(
    name="supcon", title="Supervised contrastive",
    explanation="L = −1/|P(i)| Σ_{p∈P(i)} ln(e^{s(x_i,x_p)/τ} / Σ_{a≠i} e^{s(x_i,x_a)/τ}): every image of the "
    "same label is a positive.",
    settings=(temperature_setting(SUPCON_TEMPERATURE),), accepts=(MinedKind.IN_BATCH,), default_miner="in-batch",
    factory=f"{LOSSES}.infonce:build_supcon"))

for _name, _title, _explanation in (
    ("semi-hard", "Semi-hard", "every semi-hard triplet: d(A,P) < d(A,N) ≤ d(A,P) + m."),
    ("hard", "Hard", "every hard triplet: d(A,N) ≤ d(A,P)."),
    ("all", "All", "every triplet; the loss averages those with d(A,N) < d(A,P) + m (a non-zero loss)."),
    ("easy", "Easy", "every easy triplet: d(A,N) > d(A,P) + m (no signal; for inspection and comparison)."),
):
    register_miner(Miner(_name, _title, _explanation, MinedKind.TRIPLET_SET,
                         f"{MINERS}:{_name.replace('-', '_')}_triplets", uses_margin=True, settings=(MEMORY_SIZE,)))
register_miner(Miner(
    "batch-hard", "Batch-hard", "per anchor, its farthest positive and its closest negative.",
    MinedKind.TRIPLETS, f"{MINERS}:BatchHardMiner", settings=(MEMORY_SIZE,)))
register_miner(Miner(
    "facenet", "FaceNet semi-hard", "per anchor-positive pair, the closest negative that is farther than the "
    "positive and within m.", MinedKind.TRIPLETS, f"{MINERS}:FaceNetMiner", uses_margin=True,
    settings=(MEMORY_SIZE,)))
register_miner(Miner(
    "all-pairs", "All pairs", "every similar pair and every dissimilar pair of the batch.",
    MinedKind.PAIRS, f"{MINERS}:AllPairsMiner", settings=(MEMORY_SIZE,)))
register_miner(Miner(
    "hard-pairs", "Hard pairs", "pairs that break the ordering: a similar pair farther than that image's closest "
    "dissimilar one, a dissimilar pair closer than its farthest similar one.", MinedKind.PAIRS,
    f"{MINERS}:HardPairsMiner", settings=(MEMORY_SIZE,)))
register_miner(Miner(
    "in-batch", "In-batch negatives", "every other image of the batch is a candidate; the softmax weighs the "
    "closest most.", MinedKind.IN_BATCH, f"{MINERS}:InBatchMiner"))
