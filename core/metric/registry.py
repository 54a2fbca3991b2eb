"""Every objective and miner, registered once: name, title, a one-sentence explanation with its
formula, its settings (defaults and ranges) and its factory. `resolve_objective` (the run's config checks,
core.training.config, and `make_loss`, core.metric.losses), the command line's options (core.cli) and the Train
page's widgets all read this registry, so adding an objective or a miner is one module in
`core/metric/objectives/` (discovered on first use) and one test (README: "Adding an objective or
a miner").

An added loss is one module holding its nn.Module and its `register_objective(...)`; an added
miner one module holding its miner and its `register_miner(...)`, with settings of its own if it
has any; reading the registry imports those modules, torch with them. The built-in ones are
registered by core.metric.builtins, which names their factories ("module:attribute") and imports
no torch: the command line checks its arguments and the pages build their widgets without it.

Which miners serve which objective: a miner says what it returns (MinedKind) and an objective
which of those it accepts, so a new miner appears under every objective that can use it.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional, Union

from core.metric.categories import CATEGORIES, Category, PairKind  # noqa: F401  (read here by pages and losses)

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
    # a setting added after runs were stored with their options: left out of a run's options at its
    # default, so stored and new configs read, compare and resume alike while it is off
    omit_default: bool = False

    def check(self, value: Any, objective: str, owner: str = "objective") -> Any:
        """value as stored, or a ValueError sentence naming the setting and what is allowed.
        objective: the name of the objective (or miner, owner="miner") the setting belongs to."""
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{self.name} must be one of: {', '.join(self.choices)}; got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.name} must be a number from {_shown(self.low)} to {_shown(self.high)}, "
                             f"got {value!r}")
        number = float(value)
        if not (self.low <= number <= self.high):  # also false for NaN
            raise ValueError(f"{self.name} must be in [{_shown(self.low)}, {_shown(self.high)}] for the {objective} "
                             f"{owner}, got {_shown(value)}")
        return number


def _shown(number: float) -> str:
    """A bound or value as a person writes it: 65536, not 65536.0; 0.2 as 0.2."""
    value = float(number)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:g}"


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
    """A miner: `factory(margin, **settings) -> miner` (core.metric.miners: a Miner whose
    `mine(batch)` returns what `returns` says, or a no_grad callable (dist, labels) -> mined),
    settings being the values of its own `settings` (kept in RunConfig.options, offered by the
    command line and the Train page like an objective's). `uses_margin`: its picks depend on
    the margin."""

    name: str
    title: str
    explanation: str
    returns: MinedKind
    factory: Factory
    uses_margin: bool = False
    settings: tuple[Setting, ...] = ()


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


# How the built-in ones are listed (forms, --help); others follow in registration order. Their
# modules register in whatever order they are first imported, so the listing does not rely on it.
LISTED_FIRST = ("triplet", "contrastive", "infonce", "supcon", "semi-hard", "hard", "all", "easy", "batch-hard",
                "facenet", "all-pairs", "hard-pairs", "in-batch")


def _listed(table: dict) -> dict:
    rank = {name: i for i, name in enumerate(LISTED_FIRST)}
    return dict(sorted(table.items(), key=lambda item: rank.get(item[0], len(rank))))


def objectives() -> dict[str, Objective]:
    """Every registered objective by name: the built-in ones first (LISTED_FIRST), then the
    others in registration order."""
    _discover()
    return _listed(_OBJECTIVES)


def miners() -> dict[str, Miner]:
    """Every registered miner by name, listed as objectives() lists objectives."""
    _discover()
    return _listed(_MINERS)


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
    """Each setting name once (the first objective's or miner's spec of it), for the command line."""
    found: dict[str, Setting] = {}
    for spec in [*objectives().values(), *miners().values()]:
        for setting in spec.settings:
            found.setdefault(setting.name, setting)
    return found


def settings_of(loss: str, miner_name: str) -> tuple[Setting, ...]:
    """The settings a run of objective `loss` with miner `miner_name` has: the objective's, then
    the miner's own (what the Train page shows)."""
    return objective(loss).settings + miner(miner_name).settings


def resolve(factory: Factory) -> Callable[..., Any]:
    """The callable behind a factory ("module:attribute" is imported now)."""
    if callable(factory):
        return factory
    module, _, attribute = factory.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _discover() -> None:
    """Import the modules that register what they define, once: the built-in objectives and
    miners (core.metric.builtins, torch-free: their factories are imported on the first build),
    then every module of core/metric/objectives/ (an added loss or miner: one module each,
    registering beside its nn.Module)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import core.metric.builtins  # noqa: F401  (registers the built-in objectives and miners, without torch)
    import core.metric.objectives as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{info.name}")


# settings that are RunConfig fields; an objective's other settings live in RunConfig.options
FIELD_SETTINGS = ("margin", "temperature", "distance", "triplet_variant")
# the margin draws every run's triplet categories, so every run has one (the objective's, or this)
CATEGORY_MARGIN_SETTING = Setting("margin", "Margin m", CATEGORY_MARGIN, low=0.01, high=10.0)
# names stored by earlier versions, read as today's: {(loss or None for any, old): new}
LEGACY_MINERS = {(None, "semihard"): "semi-hard", ("contrastive", "all"): "all-pairs",
                 ("contrastive", "hard"): "hard-pairs", ("infonce", "all"): "in-batch", ("supcon", "all"): "in-batch"}


def resolve_objective(loss: str, miner: Optional[str], values: dict[str, Any], options: Optional[dict] = None
                      ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(miner, field settings, options) of `loss`, defaults filled from the registry and every value
    checked; a ValueError sentence names what is wrong. values: margin, temperature, distance,
    triplet_variant (None: the default, or "does not apply"). A setting the objective does not
    have stays None (margin excepted: it draws the categories), and setting one to anything but
    its usual default is an error."""
    spec = objective(loss)
    miner = LEGACY_MINERS.get((loss, miner), LEGACY_MINERS.get((None, miner), miner))
    miner = spec.default_miner if miner is None else miner
    if miner not in spec.miners:
        # a miner given without its loss (the default loss is supcon, whose only miner is in-batch): name its losses
        serving = [name for name, other in objectives().items() if miner in other.miners]
        also = f"; the {miner} miner serves the {' and '.join(serving)} loss{'es' if len(serving) > 1 else ''}" \
            if serving else ""
        raise ValueError(f"miner '{miner}' does not apply to the {loss} loss; choose one of: {', '.join(spec.miners)}"
                         f"{also}")
    # a value a setting has by default under any objective is "not set" for an objective without it: configs
    # of the first versions stored temperature 0.1 (InfoNCE's) on every run, whatever the loss
    defaults = {name: {s.default for o in objectives().values() for s in o.settings if s.name == name}
                for name in FIELD_SETTINGS}
    resolved: dict[str, Any] = {}
    for name in FIELD_SETTINGS:
        value = values.get(name)
        setting = spec.setting(name) or (CATEGORY_MARGIN_SETTING if name == "margin" else None)
        if setting is not None:
            resolved[name] = setting.default if value is None else setting.check(value, loss)
        elif value is None or value in defaults[name]:
            resolved[name] = None
        else:
            having = [o.name for o in objectives().values() if o.setting(name) is not None]
            raise ValueError(f"{name} applies to the {' and '.join(having) or 'no'} loss, not {loss}")
    options = dict(options or {})
    miner_spec = miners()[miner]  # one of spec.miners, checked above
    own = [(s, loss, "objective") for s in spec.settings if s.name not in FIELD_SETTINGS]
    own += [(s, miner, "miner") for s in miner_spec.settings]
    unknown = sorted(set(options) - {s.name for s, _, _ in own})
    if unknown:
        # a miner's setting given without its miner (memory_size with the default supcon loss): name its miners
        elsewhere = [name for name, other in miners().items() if any(s.name in unknown for s in other.settings)]
        hint = f" (a setting of the {', '.join(elsewhere)} miners)" if elsewhere else ""
        if miner_spec.settings:
            raise ValueError(f"neither the {loss} loss nor the {miner} miner has a setting {', '.join(unknown)}{hint}")
        raise ValueError(f"the {loss} loss has no setting {', '.join(unknown)}{hint}")
    for setting, owner, kind in own:
        value = options.get(setting.name)
        options[setting.name] = setting.default if value is None else setting.check(value, owner, kind)
        if setting.omit_default and options[setting.name] == setting.default:
            del options[setting.name]
    if spec.check is not None:
        spec.check({**resolved, **options})
    return miner, resolved, options
