"""One frozen RunConfig: everything that decides how a run trains or embeds."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

ENCODERS = ("small_cnn", "resnet18")
LOSSES = ("contrastive", "triplet", "infonce", "supcon")
MINERS_FOR = {
    "triplet": ("semihard", "hard", "all", "easy", "batch-hard", "facenet"),
    "contrastive": ("all", "hard"),
    "infonce": ("all",),
    "supcon": ("all",),
}
DEFAULT_MINER = {"triplet": "semihard", "contrastive": "all", "infonce": "all", "supcon": "all"}
TRIPLET_VARIANTS = ("standard", "squared", "soft-margin")
SUPERVISION = ("auto", "labels", "self")  # auto: labels when the dataset has them (InfoNCE: self)
SAMPLERS = ("pk", "random")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, fp32 on CPU
DEVICES = ("auto", "cpu", "cuda")
DISTANCES = ("euclidean", "cosine")
LOSS_HELP = {
    "triplet": "L = max(0, d(A,P) − d(A,N) + m): the negative must be at least m farther than the positive.",
    "contrastive": "L = (1 − Y)·D² + Y·max(0, m − D)², Y = 0 for a similar pair and 1 for a dissimilar one.",
    "infonce": "L = −ln(e^{s(x,x⁺)/τ} / Σ e^{s(x,x_i)/τ}): two augmented views of an image are the positive, "
    "the rest of the batch are negatives.",
    "supcon": "L = −1/|P(i)| Σ_{p∈P(i)} ln(e^{s(x_i,x_p)/τ} / Σ_{a≠i} e^{s(x_i,x_a)/τ}): every image of the same "
    "label is a positive (supervised contrastive).",
}
MINER_HELP = {
    "semihard": "every semi-hard triplet: d(A,P) < d(A,N) ≤ d(A,P) + m.",
    "hard": "every hard triplet (d(A,N) ≤ d(A,P)); for pairs, the pairs that break the ordering.",
    "all": "every triplet or pair with a non-zero loss.",
    "easy": "every easy triplet: d(A,N) > d(A,P) + m (no signal; for inspection and comparison).",
    "batch-hard": "per anchor, its farthest positive and its closest negative.",
    "facenet": "per anchor-positive pair, the closest negative that is farther than the positive and within m.",
}


@dataclass(frozen=True)
class RunConfig:
    """How a run trains. `asdict(cfg)` goes into the run row and the checkpoint's metadata."""

    dataset: str
    encoder: str = "small_cnn"
    embedding_dim: int = 128
    loss: str = "triplet"
    miner: Optional[str] = None  # None: the loss's default miner
    margin: float = 0.2
    temperature: float = 0.1
    distance: str = "euclidean"
    epochs: int = 8
    batch_size: int = 256
    lr: float = 3e-3
    device: str = "auto"
    seed: int = 0
    triplet_variant: str = "standard"
    supervision: str = "auto"
    sampler: str = "pk"  # P classes × K images per batch when labels are used
    samples_per_class: int = 4
    precision: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.miner is None:
            object.__setattr__(self, "miner", DEFAULT_MINER.get(self.loss))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a sentence naming the bad value and what is allowed."""
        _choice("encoder", self.encoder, ENCODERS)
        _choice("loss", self.loss, LOSSES)
        _choice("device", self.device, DEVICES)
        _choice("distance", self.distance, DISTANCES)
        _choice("triplet_variant", self.triplet_variant, TRIPLET_VARIANTS)
        _choice("supervision", self.supervision, SUPERVISION)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("precision", self.precision, PRECISIONS)
        if self.triplet_variant != "standard" and self.loss != "triplet":
            raise ValueError(f"the {self.triplet_variant} variant applies to the triplet loss, not {self.loss}")
        if self.triplet_variant == "squared" and self.distance != "euclidean":
            raise ValueError(f"the squared variant needs the euclidean distance, got {self.distance!r}")
        _at_least("samples_per_class", self.samples_per_class, 2, 1024)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        allowed = MINERS_FOR[self.loss]
        if self.miner not in allowed:
            raise ValueError(
                f"miner '{self.miner}' does not apply to the {self.loss} loss; choose one of: {', '.join(allowed)}"
            )
        _at_least("embedding_dim", self.embedding_dim, 2, 4096)
        _at_least("epochs", self.epochs, 1, 10_000)
        _at_least("batch_size", self.batch_size, 4, 65_536)
        _at_least("seed", self.seed, 0, 2**32 - 1)
        if not (0 < self.margin <= 10):
            raise ValueError(f"margin must be in (0, 10], got {self.margin}")
        if not (0 < self.temperature <= 10):
            raise ValueError(f"temperature must be in (0, 10], got {self.temperature}")
        if not (0 < self.lr <= 1):
            raise ValueError(f"learning rate must be in (0, 1], got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """Build from stored or user-supplied values; unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown run settings: {', '.join(unknown)}")
        return cls(**values)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of: {', '.join(allowed)}; got {value!r}")


def _at_least(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (low <= value <= high):
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
