"""An encoder's width: the channels of its first stage (later stages double it). No torch here, so
the settings (core.training.config) and the checkpoint checks read it without importing torch.

DEFAULT_WIDTHS is what a new run gets. LEGACY_WIDTHS is what every checkpoint and stored run
setting written before the width was a setting was built with: their configs have no "width", and
stored_width reads them as that.
"""
from __future__ import annotations

from typing import Any

DEFAULT_WIDTHS = {"small_cnn": 48, "resnet18": 64}
LEGACY_WIDTHS = {"small_cnn": 32, "resnet18": 64}
WIDTH_RANGE = (4, 512)


def stored_width(config: dict) -> Any:
    """The width of a stored config's encoder: its own, or the one its encoder had before the width
    was a setting (None for an encoder this app does not build)."""
    return config["width"] if "width" in config else LEGACY_WIDTHS.get(config.get("encoder", "small_cnn"))


def width_problem(width: Any) -> str | None:
    """None for an allowed width, else the sentence that says what is allowed."""
    low, high = WIDTH_RANGE
    if isinstance(width, bool) or not isinstance(width, int) or not low <= width <= high:
        return f"width must be a whole number from {low} to {high}, got {width!r}"
    return None
