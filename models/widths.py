"""An encoder's width (the channels of its first stage; later stages double it) and a run's
supervised augmentation, which decides whether its encoder embeds with the mirror average, and its
precision, which its encoder also embeds under. No
torch here, so the settings (core.training.config) and the checkpoint checks read them without
importing torch.

DEFAULT_WIDTHS is what a new run gets. LEGACY_WIDTHS is what every checkpoint and stored run
setting written before the width was a setting was built with: their configs have no "width", and
stored_width reads them as that. Likewise a config written before the augmentation was a setting
has no "augment": it trained without any (LEGACY_AUGMENT), and stored_augment reads it as that.
"""
from __future__ import annotations

from typing import Any

DEFAULT_WIDTHS = {"vgg_grid": 32, "vgg_cnn": 32, "small_cnn": 48, "grid_cnn": 48, "resnet18": 64}
# grid_cnn, vgg_cnn and vgg_grid configs always store theirs
LEGACY_WIDTHS = {"vgg_grid": 32, "vgg_cnn": 32, "small_cnn": 32, "grid_cnn": 48, "resnet18": 64}
# the encoder of a stored config that names none: every config from before vgg_cnn was the default
LEGACY_ENCODER = "small_cnn"
# What a label-supervised batch goes through before the encoder (core.training.augment.augment_batch):
# "flip" mirrors half the images, "erase" blanks a square in half of them. Two-view runs draw their
# own views. A run whose augmentation flips embeds with the mirror average (models.encoders).
AUGMENTS = ("none", "flip", "erase", "flip+erase")
DEFAULT_AUGMENT = "flip+erase"
LEGACY_AUGMENT = "none"
# Datasets whose images are not the same thing mirrored: a mirrored digit is another glyph (five steps
# on digits with flip+erase reach MAP@R 0.46 against 0.68 with none). A new run on these gets no
# augmentation unless it asks for one.
ORIENTED_DATASETS = ("digits",)
WIDTH_RANGE = (4, 512)
# A run's arithmetic, in training and when its encoder embeds (models.encoders.Encoder.precision):
# auto is bf16 autocast on CUDA and on CPUs with bf16 instructions, else float32.
PRECISIONS = ("auto", "fp32", "bf16")


def stored_width(config: dict) -> Any:
    """The width of a stored config's encoder: its own, or the one its encoder had before the width
    was a setting (None for an encoder this app does not build)."""
    return config["width"] if "width" in config else LEGACY_WIDTHS.get(config.get("encoder", LEGACY_ENCODER))


def width_problem(width: Any) -> str | None:
    """None for an allowed width, else the sentence that says what is allowed."""
    low, high = WIDTH_RANGE
    if isinstance(width, bool) or not isinstance(width, int) or not low <= width <= high:
        return f"width must be a whole number from {low} to {high}, got {width!r}"
    return None


def default_augment(dataset: Any) -> str:
    """What a new run on this dataset goes through when it names no augmentation."""
    return LEGACY_AUGMENT if dataset in ORIENTED_DATASETS else DEFAULT_AUGMENT


def stored_augment(config: dict) -> Any:
    """A stored config's augmentation: its own, or none for a config written before it was a setting."""
    return config.get("augment", LEGACY_AUGMENT)


def stored_precision(config: dict) -> str:
    """The precision a stored config's encoder embeds under: its own where it is one of PRECISIONS,
    else auto (a config from before the setting, or one that names something unknown)."""
    precision = config.get("precision", "auto")
    return "auto" if precision_problem(precision) else precision


def precision_problem(precision: Any) -> str | None:
    """None for one of PRECISIONS, else the sentence that says what is allowed."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        return f"precision must be one of: {', '.join(PRECISIONS)}; got {precision!r}"
    return None


def mirror_averaged(augment: Any) -> bool:
    """Whether an encoder trained with this augmentation embeds with the mirror average."""
    return isinstance(augment, str) and "flip" in augment.split("+")


def augment_problem(augment: Any) -> str | None:
    """None for an allowed augmentation, else the sentence that says what is allowed."""
    if augment not in AUGMENTS:
        return f"augment must be one of: {', '.join(AUGMENTS)}; got {augment!r}"
    return None
