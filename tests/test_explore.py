import numpy as np

from core import explore


def test_a_big_map_is_a_bounded_sample_plus_a_density_picture(monkeypatch):
    monkeypatch.setattr(explore, "INTERACTIVE_POINTS", 50)
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.normal(-5, 0.1, (150, 2)), rng.normal(5, 0.1, (50, 2))]).astype(np.float32)
    pixels = rng.integers(0, 255, (200, 4, 4, 1), dtype=np.uint8)
    labels = [0] * 150 + [1] * 50
    points, density = explore.map_layers(coords, pixels, labels, ["left", "right"])
    assert len(points) == 50 and points["position"].is_unique
    row = points.iloc[0]
    np.testing.assert_allclose([row.x, row.y], coords[row.position])
    assert row.label == ("left" if row.position < 150 else "right")
    assert row.image.startswith("data:image/png;base64,")
    # every point is in the picture: the lower-left cluster is darker (denser) than the upper-right
    assert density.shape == (explore.DENSITY_BINS, explore.DENSITY_BINS) and density.dtype == np.uint8
    corner = 20  # the clusters sit in the lower-left and upper-right corners of the picture
    assert density[-corner:, :corner].min() < density[:corner, -corner:].min() < 255
    assert density[:corner, :corner].min() == 255  # nothing upper-left


def test_a_small_map_shows_every_point():
    coords = np.zeros((10, 2), np.float32)
    points, density = explore.map_layers(coords, np.zeros((10, 2, 2, 3), np.uint8), [None] * 10, [])
    assert len(points) == 10 and density is None and set(points.label) == {"unlabeled"}
