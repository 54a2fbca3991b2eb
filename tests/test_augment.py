"""Augmented views: shapes, dtype, ranges, seeded determinism, and views that differ but still
show the same image."""
import numpy as np
import pytest
import torch

from core.training import augment
from core.training.augment import augment_batch, augmented_pairs, random_views, resolve_supervision, two_views
from core.data.datasets import load_builtin
from models.encoders import to_input


def images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=generator) * 2 - 1


@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32), (3, 33), (1, 3)])
def test_views_keep_shape_dtype_and_range(channels, size):
    x = images(16, channels, size)
    out = two_views(x, torch.Generator().manual_seed(0))
    assert out.shape == (32, channels, size, size) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()


def test_seeded_generators_repeat_and_the_two_views_differ():
    x = images(8, 3, 24)
    first = two_views(x, torch.Generator().manual_seed(7))
    again = two_views(x, torch.Generator().manual_seed(7))
    other = two_views(x, torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    view1, view2 = first.split(8)
    assert ((view1 - view2).abs().flatten(1).mean(1) > 1e-3).all()  # every pair differs
    assert ((view1 - x).abs().flatten(1).mean(1) > 1e-3).all()  # and differs from the image


def test_views_still_show_their_own_image():
    # digits: a view's most correlated other view is the one of the same image, far above chance
    pixels, _, _, _ = load_builtin("digits")
    x = to_input(torch.from_numpy(pixels[:200]), 1)
    view1, view2 = two_views(x, torch.Generator().manual_seed(0)).split(200)
    a = torch.nn.functional.normalize(view1.flatten(1) - view1.flatten(1).mean(1, keepdim=True), dim=1)
    b = torch.nn.functional.normalize(view2.flatten(1) - view2.flatten(1).mean(1, keepdim=True), dim=1)
    matched = ((a @ b.T).argmax(dim=1) == torch.arange(200)).float().mean()
    assert matched > 0.06, matched  # chance is 0.005; crops and flips of 8×8 digits keep ~0.13


def test_colour_images_get_jitter_and_sometimes_grayscale():
    x = images(400, 3, 16)
    out = random_views(x, torch.Generator().manual_seed(1), flip=False)
    channel_spread = (out.max(dim=1).values - out.min(dim=1).values).flatten(1).amax(1)
    grey_fraction = (channel_spread < 1e-5).float().mean()
    assert 0.1 < grey_fraction < 0.3  # GRAYSCALE_PROBABILITY = 0.2
    # grey input stays one channel and is never recoloured
    assert random_views(images(4, 1, 16), torch.Generator().manual_seed(1)).shape == (4, 1, 16, 16)


def test_blur_smooths_and_only_when_drawn(monkeypatch):
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2
    x = checker.float().expand(64, 1, 32, 32).clone()  # values 0/1: the [0, 1] space blur works in
    monkeypatch.setattr(augment, "BLUR_PROBABILITY", 1.0)
    blurred = augment._gaussian_blur(x, torch.Generator().manual_seed(0))
    spread, before = blurred.std(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))
    assert blurred.shape == x.shape and (spread <= before + 1e-3).all()
    assert (spread < 0.5 * before).float().mean() > 0.5  # sigma is drawn from [0.1, 1]: most blur hard
    torch.testing.assert_close(blurred.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.02, rtol=0)
    monkeypatch.setattr(augment, "BLUR_PROBABILITY", 0.0)
    torch.testing.assert_close(augment._gaussian_blur(x, torch.Generator().manual_seed(0)), x)


def test_augmented_pairs_for_the_preview():
    pixels = np.random.default_rng(0).integers(0, 256, (30, 20, 20, 3), dtype=np.uint8)
    pairs = augmented_pairs(pixels, n=5, seed=3)
    assert pairs.shape == (5, 2, 20, 20, 3) and pairs.dtype == np.uint8
    np.testing.assert_array_equal(pairs, augmented_pairs(pixels, n=5, seed=3))
    assert (pairs[:, 0] != pairs[:, 1]).any(axis=(1, 2, 3)).all()
    grey = augmented_pairs(np.zeros((3, 8, 8, 1), np.uint8) + 128, n=6)
    assert grey.shape == (3, 2, 8, 8, 1)


@pytest.mark.parametrize("supervision,loss,labeled,expected", [
    ("auto", "triplet", True, "labels"),
    ("auto", "supcon", True, "labels"),
    ("auto", "infonce", True, "self"),
    ("auto", "triplet", False, "self"),
    ("self", "triplet", True, "self"),
    ("labels", "contrastive", True, "labels"),
])
def test_supervision_resolves_as_documented(supervision, loss, labeled, expected):
    assert resolve_supervision(supervision, loss, labeled) == expected


def test_impossible_supervision_fails_with_a_sentence():
    with pytest.raises(ValueError, match="needs a labeled dataset"):
        resolve_supervision("labels", "triplet", False)
    with pytest.raises(ValueError, match="InfoNCE / NT-Xent learns from two views"):
        resolve_supervision("labels", "infonce", True)


def test_a_supervised_batch_is_flipped_and_erased_as_its_setting_says_and_seeded():
    x = images(400, 1, 28, seed=3) * 0.5 + 0.5  # no pixel is 0 before erasing
    assert (x != 0).all()
    assert augment_batch(x, "none", torch.Generator().manual_seed(0)) is x
    flipped = augment_batch(x, "flip", torch.Generator().manual_seed(0))
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    kept = (flipped == x).flatten(1).all(1)
    assert (mirrored | kept).all() and 150 < int(mirrored.sum()) < 250  # about half, each whole
    erased = augment_batch(x, "erase", torch.Generator().manual_seed(0))
    blank = (erased == 0)
    touched = blank.flatten(1).any(1)
    assert 150 < int(touched.sum()) < 250
    assert torch.equal(erased[~blank], x[~blank])  # only the square changes
    for i in torch.nonzero(touched).flatten()[:20]:
        rows, cols = torch.nonzero(blank[i, 0], as_tuple=True)
        height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert height <= 9 and width <= 9 and len(rows) == height * width  # one square, cut at the border
    assert (blank.flatten(1).sum(1)[touched] == 81).float().mean() > 0.4  # most lie whole inside
    both = augment_batch(x, "flip+erase", torch.Generator().manual_seed(5))
    torch.testing.assert_close(both, augment_batch(x, "flip+erase", torch.Generator().manual_seed(5)), rtol=0, atol=0)
    assert not torch.equal(both, augment_batch(x, "flip+erase", torch.Generator().manual_seed(6)))
    small = augment_batch(images(50, 3, 8), "erase", torch.Generator().manual_seed(0))
    assert small.shape == (50, 3, 8, 8) and (small == 0).flatten(1).sum(1).max() == 3 * 9  # a third of 8: 3 px
    with pytest.raises(ValueError, match="augment must be one of"):
        augment_batch(x, "rotate", None)
