"""Who may do what: the roles of a signed-in app (viewer, editor, admin) and the read-only demo,
checked in the services that write, whatever page or request called them.

A process acts for nobody in particular (`current()` is None) unless something says otherwise:
the command line and the workers act as the machine's owner, with every right. The app sets the
signed-in person (or the demo) for each script run (`act_as`); every service that writes calls
`require` before it writes, so hiding a button is never the only guard. A leaf module: the data,
training, runs and exploration layers all check here.

Roles, each with the rights of the one before:
  viewer: explore, search, compare, export (and the map and statistics jobs a run needs to be seen);
  editor: also import, train, edit datasets, cancel their own runs;
  admin:  also delete anything, cancel anyone's run.
Demo mode: everyone is a viewer who cannot start even the map jobs; every write is refused.
"""
from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Optional

ROLES = ("viewer", "editor", "admin")
DEMO_ENV = "EMBEDDING_LAB_DEMO"

# what each action needs (the lowest role allowed)
NEEDS = {
    "compute": "viewer",  # a run's statistics, maps, a duplicate search: what seeing a run needs
    "import": "editor", "train": "editor", "edit": "editor", "cancel": "editor",
    "delete": "admin", "cancel anyone's": "admin",
}


class Forbidden(ValueError):
    """An action the acting person's role (or the demo) does not allow; the message says which (a
    ValueError: every page and the command line already show those as the sentence they are)."""


@dataclass(frozen=True)
class Identity:
    """Who a script run acts for: an email with a role, or the demo (read-only for everyone)."""

    email: Optional[str]
    role: str
    demo: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"a role is one of {', '.join(ROLES)}; got {self.role!r}")


_UNSET = object()
_acting: ContextVar = ContextVar("embedding_lab_identity", default=_UNSET)
_resolver: Optional[Callable[[], Optional[Identity]]] = None


def act_as(identity: Optional[Identity]) -> None:
    """This thread's (a script run's) person from now on; None: the machine's owner."""
    _acting.set(identity)


def resolve_with(resolver: Optional[Callable[[], Optional[Identity]]]) -> None:
    """Where a thread that was never told (act_as) finds its person: the app's session. A
    Streamlit fragment that reruns on a timer can run in a fresh thread, without the app's
    script having run there; without this it would act as the machine's owner."""
    global _resolver
    _resolver = resolver


def current() -> Optional[Identity]:
    acting = _acting.get()
    if acting is _UNSET:
        return _resolver() if _resolver is not None else None
    return acting


def demo_mode() -> bool:
    """EMBEDDING_LAB_DEMO=1 (or true/yes/on): the app is read-only for everyone."""
    return os.environ.get(DEMO_ENV, "").strip().lower() in ("1", "true", "yes", "on")


PERSON_JOBS_ENV = "EMBEDDING_LAB_PERSON_JOBS"  # runs one signed-in person may have running or queued at once
PERSON_UPLOAD_ENV = "EMBEDDING_LAB_PERSON_UPLOAD_MB"  # megabytes one signed-in person may upload a day


def person_limit(name: str) -> Optional[int]:
    """A per-person limit from the environment (the app copies its secrets there): None when
    unset; ValueError with a sentence for anything but a whole number >= 1."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {raw!r}")
    return int(raw)


def who() -> Optional[str]:
    """The email to record as the maker of a dataset or run (None for the machine's owner)."""
    acting = current()
    return None if acting is None else acting.email


def allowed(action: str, owner: Optional[str] = None) -> bool:
    """Whether the acting person may do `action` (a key of NEEDS); owner: who made the thing
    acted on (an editor cancels only their own runs)."""
    try:
        require(action, owner)
    except Forbidden:
        return False
    return True


def require(action: str, owner: Optional[str] = None) -> None:
    """Forbidden, with a sentence, unless the acting person may do `action`. The machine's owner
    (no identity set: the command line, a worker) may do everything."""
    if action not in NEEDS:
        raise ValueError(f"unknown action {action!r}")
    acting = current()
    if acting is None:
        return
    what = {"compute": "start a run's map or statistics", "import": "import images", "train": "start a run",
            "edit": "edit a dataset", "cancel": "cancel a run", "delete": "delete", "cancel anyone's": "cancel a run"}[action]
    if acting.demo:
        raise Forbidden(f"this is a read-only demo: nobody may {what} here")
    needed = NEEDS[action]
    if action == "cancel" and (owner is None or owner != acting.email):  # not theirs (or made by the machine's owner)
        needed, what = NEEDS["cancel anyone's"], "cancel someone else's run"
    if ROLES.index(acting.role) < ROLES.index(needed):
        raise Forbidden(f"{acting.email or 'you'} ({acting.role}) may not {what}: that needs the "
                        f"{needed} role; ask an admin of this app")
