"""Every objective and miner, registered once: name, title, a one-sentence explanation with its
formula, its settings (defaults and ranges) and its factory. The run's config checks
(core.training.config), `make_loss` (core.metric.losses), the command line's options (core.cli) and the Train
page's widgets all read this registry, so adding an objective or a miner is one module in
`core/metric/objectives/` (discovered on first use) and one test.

Torch-free: pages read it. A factory is a callable, or "module:attribute" imported when a run
builds its loss, so reading a spec never imports torch (a new objective's module imports torch
inside its factory).

Which miners serve which objective: a miner says what it returns (MinedKind) and an objective
which of those it accepts, so a new miner appears under every objective that can use it.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional, Union


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


class MinedKind(str, Enum):
    """What a miner returns (core.metric.miners)."""

    TRIPLET_SET = "triplet-set"  # every triplet of a category, as ranges of sorted negatives
    TRIPLETS = "triplets"  # O(B²) (anchor, positive, negative) index triplets
    PAIRS = "pairs"  # similar and dissimilar pairs
    IN_BATCH = "in-batch"  # every other row of the batch is a candidate (softmax losses)


CATEGORY_MARGIN = 0.2  # the margin that draws the categories of runs whose objective has none

Factory = Union[str, Callable[..., Any]]


@dataclass(frozen=True)
class Setting:
    """One setting of an objective. A number lies in [low, high]; a choice in `choices`.
    `name` is a RunConfig field (margin, temperature, distance, triplet_variant) or, for a
    setting no built-in objective has, a key of RunConfig.options."""

    name: str
    title: str
    default: Any
    help: str = ""
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    choices: tuple = ()
    choice_help: dict = field(default_factory=dict)  # one line per choice, for widgets and --help

    def check(self, value: Any, objective: str) -> Any:
        """value as stored, or a ValueError sentence naming the setting and what is allowed."""
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{self.name} must be one of: {', '.join(self.choices)}; got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.name} must be a number from {self.low} to {self.high}, got {value!r}")
        number = float(value)
        if not (self.low <= number <= self.high):  # also false for NaN
            raise ValueError(f"{self.name} must be in [{self.low}, {self.high}] for the {objective} "
                             f"objective, got {value}")
        return number


@dataclass(frozen=True)
class Objective:
    """A training objective. `factory(settings: dict, miner) -> torch.nn.Module` builds its loss
    from the values of `settings` and a built miner (core.metric.miners); `check(values)` may refuse a
    combination of settings with a ValueError sentence; `self_supervised` objectives learn from
    two views of each image when supervision is auto."""

    name: str
    title: str
    explanation: str
    settings: tuple[Setting, ...]
    accepts: tuple[MinedKind, ...]
    default_miner: str
    factory: Factory
    check: Optional[Callable[[dict], None]] = None
    self_supervised: bool = False

    def setting(self, name: str) -> Optional[Setting]:
        return next((s for s in self.settings if s.name == name), None)

    @property
    def miners(self) -> tuple[str, ...]:
        """Names of the registered miners this objective can use, its default first."""
        names = [m.name for m in miners().values() if m.returns in self.accepts]
        return tuple(sorted(names, key=lambda n: n != self.default_miner))


@dataclass(frozen=True)
class Miner:
    """A miner: `factory(margin) -> callable(dist, labels) -> mined` (no_grad), where mined is
    what `returns` says (core.metric.miners). `uses_margin`: its picks depend on the margin."""

    name: str
    title: str
    explanation: str
    returns: MinedKind
    factory: Factory
    uses_margin: bool = False


_OBJECTIVES: dict[str, Objective] = {}
_MINERS: dict[str, Miner] = {}
_discovered = False


def register_objective(objective: Objective) -> Objective:
    """Add an objective; a second one of the same name is an error."""
    return _register(_OBJECTIVES, "an objective", objective)


def register_miner(miner: Miner) -> Miner:
    """Add a miner; a second one of the same name is an error."""
    return _register(_MINERS, "a miner", miner)


def _register(table: dict, what: str, entry):
    _discover()
    if entry.name in table:
        raise ValueError(f"{what} named {entry.name!r} is already registered")
    table[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove an objective or a miner (tests register their own and take them back)."""
    _OBJECTIVES.pop(name, None)
    _MINERS.pop(name, None)


def objectives() -> dict[str, Objective]:
    """Every registered objective by name, in registration order."""
    _discover()
    return dict(_OBJECTIVES)


def miners() -> dict[str, Miner]:
    _discover()
    return dict(_MINERS)


def objective(name: str) -> Objective:
    found = objectives().get(name)
    if found is None:
        raise ValueError(f"loss must be one of: {', '.join(objectives())}; got {name!r}")
    return found


def miner(name: str) -> Miner:
    found = miners().get(name)
    if found is None:
        raise ValueError(f"miner must be one of: {', '.join(miners())}; got {name!r}")
    return found


def all_settings() -> dict[str, Setting]:
    """Each setting name once (the first objective's spec of it), for the command line."""
    found: dict[str, Setting] = {}
    for spec in objectives().values():
        for setting in spec.settings:
            found.setdefault(setting.name, setting)
    return found


def resolve(factory: Factory) -> Callable[..., Any]:
    """The callable behind a factory ("module:attribute" is imported now)."""
    if callable(factory):
        return factory
    module, _, attribute = factory.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _discover() -> None:
    """Import every module of core/objectives once; each registers what it defines."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import core.metric.objectives as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{info.name}")
