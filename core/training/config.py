"""One frozen RunConfig: everything that decides how a run trains or embeds. The objective, its
miner and its settings are checked against core.metric.registry, where each objective declares them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from core.metric import registry
from core.metric.registry import FIELD_SETTINGS, resolve_objective  # noqa: F401  (cli and pages read FIELD_SETTINGS here)

ENCODERS = ("small_cnn", "resnet18")
SUPERVISION = ("auto", "labels", "self")  # auto: labels when the dataset has them (self-supervised objectives: views)
SAMPLERS = ("pk", "random")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on CUDA, fp32 on CPU
DEVICES = ("auto", "cpu", "cuda")
@dataclass(frozen=True)
class RunConfig:
    """How a run trains. `asdict(cfg)` goes into the run row and the checkpoint's metadata."""

    dataset: str
    encoder: str = "small_cnn"
    embedding_dim: int = 128
    loss: str = "triplet"
    # None: the objective's default (core.metric.registry); settings the objective lacks stay None
    miner: Optional[str] = None
    margin: Optional[float] = None
    temperature: Optional[float] = None
    distance: Optional[str] = None
    epochs: int = 8
    batch_size: int = 256
    lr: float = 3e-3
    device: str = "auto"
    seed: int = 0
    triplet_variant: Optional[str] = None
    supervision: str = "auto"
    sampler: str = "pk"  # P classes × K images per batch when labels are used
    samples_per_class: int = 4
    precision: str = "auto"
    compile: bool = False
    options: dict = field(default_factory=dict)  # settings of the objective that are not fields here, and the miner's

    def __post_init__(self) -> None:
        self.validate()

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self.to_dict().items())))

    def validate(self) -> None:
        """Fill the objective's defaults and raise ValueError with a sentence naming the bad value
        and what is allowed."""
        _choice("encoder", self.encoder, ENCODERS)
        _choice("device", self.device, DEVICES)
        _choice("supervision", self.supervision, SUPERVISION)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a mapping of setting names to values, got {self.options!r}")
        values = {name: getattr(self, name) for name in FIELD_SETTINGS}
        miner, resolved, options = resolve_objective(self.loss, self.miner, values, self.options)
        object.__setattr__(self, "miner", miner)
        object.__setattr__(self, "options", options)
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        _at_least("samples_per_class", self.samples_per_class, 2, 1024)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        _at_least("embedding_dim", self.embedding_dim, 2, 4096)
        _at_least("epochs", self.epochs, 1, 10_000)
        _at_least("batch_size", self.batch_size, 4, 65_536)
        _at_least("seed", self.seed, 0, 2**32 - 1)
        if not (0 < self.lr <= 1):
            raise ValueError(f"learning rate must be in (0, 1], got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def objective_settings(self) -> dict[str, Any]:
        """The values of the objective's own settings, by name (what its factory takes)."""
        spec = registry.objective(self.loss)
        return {s.name: getattr(self, s.name) if s.name in FIELD_SETTINGS else self.options[s.name]
                for s in spec.settings}

    def miner_settings(self) -> dict[str, Any]:
        """The values of the miner's own settings, by name (what its factory takes besides the margin)."""
        return {s.name: self.options[s.name] for s in registry.miner(self.miner).settings}

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
