"""Class-balanced P×K batches: every anchor has positives, classes and images are covered."""
import numpy as np
import pytest

from core.training.sampler import ClassBalancedSampler, RandomSampler, make_sampler, pk_shape


def check_batches(batches: np.ndarray, labels: np.ndarray, p: int, k: int) -> None:
    for batch in batches:
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == p and (counts == k).all()  # P classes, K images each: every anchor has K−1 positives
        members_of_big_classes = [i for i in batch if (labels == labels[i]).sum() >= k]
        assert len(set(members_of_big_classes)) == len(members_of_big_classes)  # no repeats inside a batch


def test_many_classes_give_p_classes_of_k_images():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 50, 2000)
    sampler = ClassBalancedSampler(labels, batch_size=64, samples_per_class=4)
    assert (sampler.classes_per_batch, sampler.samples_per_class, sampler.batch_size) == (16, 4, 64)
    batches = sampler.epoch(np.random.default_rng(1))
    assert batches.shape == (2000 // 64, 64) and batches.dtype == np.int64
    check_batches(batches, labels, 16, 4)
    # classes are drawn uniformly: over many epochs every class appears about equally often
    drawn = np.concatenate([labels[sampler.epoch(np.random.default_rng(s))[:, ::4]].ravel() for s in range(40)])
    per_class = np.bincount(drawn, minlength=50)
    assert per_class.min() > 0.7 * per_class.mean() and per_class.max() < 1.3 * per_class.mean()


def test_fewer_classes_than_p_fill_the_batch_with_more_images_per_class():
    labels = np.repeat(np.arange(10), 100)
    sampler = ClassBalancedSampler(labels, batch_size=256, samples_per_class=4)
    assert (sampler.classes_per_batch, sampler.samples_per_class) == (10, 25)
    batches = sampler.epoch(np.random.default_rng(0))
    assert batches.shape == (1000 // 256, 250)
    check_batches(batches, labels, 10, 25)

    # balanced classes that divide evenly: one epoch shows every image exactly once
    even = ClassBalancedSampler(labels, batch_size=40, samples_per_class=4)
    seen = np.sort(even.epoch(np.random.default_rng(3)).ravel())
    np.testing.assert_array_equal(seen, np.arange(1000))


def test_small_classes_are_sampled_with_replacement():
    labels = np.array([0] * 50 + [1] * 50 + [2] * 2)  # class 2 has fewer than K images
    sampler = ClassBalancedSampler(labels, batch_size=12, samples_per_class=4)
    batches = sampler.epoch(np.random.default_rng(0))
    assert (sampler.classes_per_batch, sampler.samples_per_class) == (3, 4)
    for batch in batches:
        small = batch[labels[batch] == 2]
        assert len(small) == 4 and set(small) <= {100, 101}
    check_batches(batches, labels, 3, 4)


def test_seeded_epochs_repeat_and_differ_between_seeds():
    labels = np.random.default_rng(0).integers(0, 7, 500)
    sampler = ClassBalancedSampler(labels, batch_size=32, samples_per_class=4)
    np.testing.assert_array_equal(sampler.epoch(np.random.default_rng(5)), sampler.epoch(np.random.default_rng(5)))
    assert not np.array_equal(sampler.epoch(np.random.default_rng(5)), sampler.epoch(np.random.default_rng(6)))


def test_random_sampler_covers_each_image_at_most_once():
    sampler = RandomSampler(103, batch_size=10)
    batches = sampler.epoch(np.random.default_rng(0))
    assert batches.shape == (10, 10) and len(np.unique(batches)) == 100
    assert RandomSampler(5, batch_size=64).batch_size == 5


@pytest.mark.parametrize("batch,k,classes,message", [
    (8, 1, 10, "samples_per_class must be >= 2"),
    (4, 8, 10, "cannot hold one class of 8 images"),
    (8, 8, 10, "holds a single class"),
])
def test_impossible_batches_fail_with_a_sentence(batch, k, classes, message):
    with pytest.raises(ValueError, match=message):
        pk_shape(batch, k, classes)


def test_make_sampler_needs_labels_for_pk():
    with pytest.raises(ValueError, match="needs class labels"):
        make_sampler("pk", None, 100, 32, 4)
    assert isinstance(make_sampler("random", None, 100, 32, 4), RandomSampler)
    assert make_sampler("pk", np.arange(20) % 2, 20, 64, 4).batch_size <= 20  # never more than the data


def test_a_batch_capped_by_the_data_names_the_setting_that_helps():
    # 12 training images cap a batch of 256: raising the batch size cannot help, lowering K can
    with pytest.raises(ValueError) as caught:
        pk_shape(256, 8, 10, n_images=12)
    assert "lower samples_per_class (K) to at most 6" in str(caught.value)
    assert "raise batch_size" not in str(caught.value)
    assert pk_shape(256, 6, 10, n_images=12) == (2, 6)
