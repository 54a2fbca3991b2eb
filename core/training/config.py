"""One frozen RunConfig: everything that decides how a run trains or embeds. The objective, its
miner and its settings are checked against core.metric.registry, where each objective declares them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from core.metric import registry
from models.widths import (DEFAULT_WIDTHS, LEGACY_ENCODER, PRECISIONS, WIDTH_RANGE, augment_problem, default_augment,
                           stored_augment, stored_width)
from core.metric.registry import FIELD_SETTINGS, resolve_objective  # noqa: F401  (cli and pages read FIELD_SETTINGS here)

ENCODERS = tuple(DEFAULT_WIDTHS)  # what models.encoders builds; the first is RunConfig's default
SUPERVISION = ("auto", "labels", "self")  # auto: labels when the dataset has them (self-supervised objectives: views)
SAMPLERS = ("pk", "random")
DEVICES = ("auto", "cpu", "cuda")
MAX_WORKERS = 1024  # a run's data-parallel processes at most (RunConfig.workers)
# What a person reads for each RunConfig field: the Train form's widget labels (pages/train_form.py
# labels its widgets with these) and every table of a run's settings. An objective's or a miner's
# own setting is titled where it is registered (core.metric.registry); see setting_title.
FIELD_TITLES = {
    "dataset": "Dataset", "encoder": "Encoder", "embedding_dim": "Embedding size", "width": "Encoder width", "device": "Device",
    "loss": "Objective", "miner": "Miner", "epochs": "Epochs", "batch_size": "Batch size", "lr": "Learning rate",
    "supervision": "Supervision", "sampler": "Batches", "samples_per_class": "K images per class",
    "augment": "Augmentation", "precision": "Precision", "compile": "torch.compile the encoder", "seed": "Seed", "workers": "Workers",
    # what an embedding run stores besides (core.runs.jobs.create_embedding_run; the Train page's
    # "Load an encoder instead"); its "encoder" holds the checkpoint's training settings
    "source_run": "Encoder of run", "checkpoint_name": "Checkpoint",
}


LEGACY_LOSS = "triplet"  # the default loss until 2026-12-06: what a stored config with none trained with


@dataclass(frozen=True)
class RunConfig:
    """How a run trains. `asdict(cfg)` goes into the run row and the checkpoint's metadata."""

    dataset: str
    encoder: str = ENCODERS[0]
    embedding_dim: int = 128
    width: Optional[int] = None  # the encoder's first-stage channels; None: its default (models.widths)
    # supervised contrastive: with the VGG encoders it reaches Fashion-MNIST's P@1 0.92 / MAP@R 0.86 in 5
    # CPU minutes where the triplet loss stops at about 0.915 / 0.86 (bench/quality.py); its inspector
    # still shows each anchor's hardest in-batch negatives by category, so the Triplets page has rows
    loss: str = "supcon"
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
    # what a label-supervised batch goes through (models.widths.AUGMENTS); a flipping run embeds
    # with the mirror average; None: the dataset's default (models.widths.default_augment)
    augment: Optional[str] = None
    precision: str = "auto"
    compile: bool = False
    # processes training the run data-parallel, each on its shard of every batch (Ray Train on the
    # cluster at EMBEDDING_LAB_RAY_ADDRESS; core.runs.parallel); 1: one process, as always
    workers: int = 1
    options: dict = field(default_factory=dict)  # settings of the objective that are not fields here, and the miner's

    def __post_init__(self) -> None:
        self.validate()

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self.to_dict().items())))

    def validate(self) -> None:
        """Fill the objective's defaults and raise ValueError with a sentence naming the bad value
        and what is allowed."""
        _choice("encoder", self.encoder, ENCODERS)
        if self.width is None:
            object.__setattr__(self, "width", DEFAULT_WIDTHS[self.encoder])
        _at_least("width", self.width, *WIDTH_RANGE)
        _choice("device", self.device, DEVICES)
        _choice("supervision", self.supervision, SUPERVISION)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("precision", self.precision, PRECISIONS)
        if self.augment is None:
            object.__setattr__(self, "augment", default_augment(self.dataset))
        problem = augment_problem(self.augment)
        if problem:
            raise ValueError(problem)
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
        _at_least("workers", self.workers, 1, MAX_WORKERS)
        _at_least("epochs", self.epochs, 1, 10_000)
        _at_least("batch_size", self.batch_size, 4, 65_536)
        if self.workers > self.batch_size:
            raise ValueError(f"workers must be at most the batch size ({self.batch_size}): each encodes its share of "
                             f"every batch; got {self.workers}")
        memory = self.options.get("memory_size")  # the miner's cross-batch memory (core.metric.miners)
        if memory and (memory != int(memory) or memory < self.batch_size):
            raise ValueError(f"memory_size must be 0 (off) or a whole number of at least the batch size "
                             f"({self.batch_size}), got {memory:g}")
        if memory and self.triplet_variant == "soft-margin" and \
                registry.miner(self.miner).returns == registry.MinedKind.TRIPLET_SET:
            raise ValueError(f"the soft-margin variant over a whole category ({self.miner}) has no cross-batch "
                             f"memory; use the batch-hard or facenet miner with it, or memory_size 0")
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
        return {s.name: self.options.get(s.name, s.default) for s in registry.miner(self.miner).settings}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """Build from stored or user-supplied values; unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown run settings: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_stored(cls, values: dict[str, Any]) -> "RunConfig":
        """from_dict of settings stored with a run or a checkpoint: those written before the encoder's
        width was a setting have none, and were built with the encoder's width of then; those written
        before the augmentation was a setting trained without any; those with no loss trained with
        the triplet loss, the default until 2026-12-06."""
        values = dict(values)
        values.setdefault("encoder", LEGACY_ENCODER)
        values.setdefault("loss", LEGACY_LOSS)
        if "width" not in values:
            values["width"] = stored_width(values)
        if "augment" not in values:
            values["augment"] = stored_augment(values)
        return cls.from_dict(values)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of: {', '.join(allowed)}; got {value!r}")


def _at_least(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (low <= value <= high):
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


def setting_title(name: str) -> str:
    """The title of a run's setting as the Train form shows it: a RunConfig field's (FIELD_TITLES),
    an objective's or miner's setting's (core.metric.registry), also under "options."; a nested
    key (an embedding run's checkpoint settings, "encoder.epochs") as "Encoder › Epochs"; any
    other name as it is."""
    if name in FIELD_TITLES:
        return FIELD_TITLES[name]
    registered = registry.all_settings().get(name)
    if registered is not None:
        return registered.title
    head, dot, rest = name.partition(".")
    if dot:
        return setting_title(rest) if head == "options" else f"{setting_title(head)} › {setting_title(rest)}"
    return name


def setting_text(value: Any) -> str:
    """A setting's value as the settings tables show it: "—" for none; a whole number stored as a
    float (a form's number field gives 256.0 for the cross-batch memory) without its ".0", so it
    reads as typed and equals the same setting stored as an int."""
    if value is None:
        return "—"
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)


def flat_settings(config: dict, prefix: str = "") -> dict[str, Any]:
    """A run's stored config as one level, nested keys joined by dots ({"options": {"k": 2}} →
    {"options.k": 2}), in the config's own order (RunConfig's field order for a training run).
    A training config stored before the encoder's width was a setting shows the width it was built
    with (models.widths.stored_width), after the embedding size, and one stored before the
    augmentation was a setting shows none after K images per class, as a config stored today does."""
    flat: dict[str, Any] = {}
    training = isinstance(config.get("encoder"), str) and "embedding_dim" in config
    legacy = {"embedding_dim": "width", "samples_per_class": "augment"}
    read = {"width": stored_width, "augment": stored_augment}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
        missing = legacy.get(key)
        if training and missing and missing not in config:
            flat[f"{prefix}{missing}"] = read[missing](config)
    return flat
