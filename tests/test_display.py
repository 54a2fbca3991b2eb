import numpy as np
import pytest

from core.data.display import enlarge


def test_a_digit_becomes_blocks_of_its_own_pixels():
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8)
    big = enlarge(digit)
    assert big.shape == (64, 64) and big.dtype == np.uint8
    for y, x in [(0, 0), (3, 5), (7, 7)]:  # each source pixel fills one 8×8 block, nothing blended
        assert (big[8 * y:8 * y + 8, 8 * x:8 * x + 8] == digit[y, x]).all()


def test_channels_and_dtype_are_kept_and_the_factor_is_a_whole_number():
    colour = np.random.default_rng(0).random((10, 12, 3)).astype(np.float32)
    big = enlarge(colour, min_side=64)
    assert big.shape == (70, 84, 3) and big.dtype == np.float32  # factor ceil(64 / 10) = 7
    assert np.array_equal(big[::7, ::7], colour)
    grey = np.zeros((8, 8, 1), np.uint8)
    assert enlarge(grey, min_side=16).shape == (16, 16, 1)


def test_images_already_big_enough_come_back_unchanged():
    image = np.zeros((64, 100, 3), np.uint8)
    assert enlarge(image) is image
    assert enlarge(image, min_side=32) is image


def test_bad_arguments_are_refused_with_a_sentence():
    with pytest.raises(ValueError, match="min_side"):
        enlarge(np.zeros((8, 8)), min_side=0)
    with pytest.raises(ValueError, match="shape"):
        enlarge(np.zeros((2, 8, 8, 1)))
