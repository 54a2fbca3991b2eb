"""Which images make up each batch of an epoch: class-balanced P×K batches or a random order.

Supervised mining needs positives: in a random batch of 256 drawn from 1,000 classes most
anchors have none, and a loss over triplets learns nothing from them. A P×K batch holds P
classes with K images each, so every anchor has K − 1 positives and (P − 1)·K negatives.
numpy only: pages and the sampler's tests stay free of torch.
"""
from __future__ import annotations

import math

import numpy as np


class ClassBalancedSampler:
    """P classes × K images per batch, `steps_per_epoch` batches an epoch.

    labels: (N,) int, the class of each training image (positions 0..N−1 are returned).
    K = samples_per_class and P = batch_size // K. When the data has fewer than P classes,
    every class is in every batch and K grows to batch_size // n_classes, so a batch stays
    close to batch_size. A batch has P·K <= batch_size images.

    Classes are chosen uniformly (as pytorch-metric-learning's MPerClassSampler does). Within a
    class an epoch walks through shuffles of its images, so each is seen about as often as its
    class is drawn and no image repeats inside a batch; a class with fewer than K images is drawn
    with replacement. An epoch has N // batch_size batches, as an epoch of a random order has.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, samples_per_class: int) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty (N,) array, got shape {labels.shape}")
        classes, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
        self.members = np.split(order, bounds)  # positions of each class's images
        self.n_classes = len(classes)
        self.classes_per_batch, self.samples_per_class = pk_shape(batch_size, samples_per_class, self.n_classes)
        self.batch_size = self.classes_per_batch * self.samples_per_class
        self.steps_per_epoch = max(1, len(labels) // batch_size)

    def epoch(self, rng: np.random.Generator) -> np.ndarray:
        """(steps_per_epoch, P·K) int64 positions; each row is one batch, K per class in a row."""
        steps, p, k = self.steps_per_epoch, self.classes_per_batch, self.samples_per_class
        # P distinct classes per batch: the first P of a random permutation of the classes
        chosen = np.argsort(rng.random((steps, self.n_classes)), axis=1)[:, :p]
        batches = np.empty((steps, p, k), dtype=np.int64)
        for c, members in enumerate(self.members):
            rows, columns = np.nonzero(chosen == c)
            need = len(rows) * k
            if need == 0:
                continue
            if len(members) < k:
                draws = rng.choice(members, need, replace=True).reshape(-1, k)
            else:
                # whole K-chunks of successive shuffles, so no image repeats inside a batch
                chunks_per_shuffle = len(members) // k
                rounds = math.ceil(len(rows) / chunks_per_shuffle)
                shuffles = [rng.permutation(members)[: chunks_per_shuffle * k] for _ in range(rounds)]
                draws = np.concatenate(shuffles).reshape(-1, k)[: len(rows)]
            batches[rows, columns] = draws
        return batches.reshape(steps, p * k)


def pk_shape(batch_size: int, samples_per_class: int, n_classes: int, n_images: int | None = None) -> tuple[int, int]:
    """(P, K) of a class-balanced batch: P = batch_size // samples_per_class classes, at most
    n_classes; with fewer classes, K grows so P·K stays close to batch_size. ValueError with a
    sentence when the batch cannot hold two classes (no anchor would have a negative), naming
    the setting that would help: when the dataset's n_images cap the batch, a bigger batch
    size cannot."""
    if samples_per_class < 2:
        raise ValueError(f"samples_per_class must be >= 2 (an anchor needs a positive), got {samples_per_class}")
    capped = n_images is not None and n_images < batch_size
    batch = min(batch_size, n_images) if n_images is not None else batch_size
    fix = (f"lower samples_per_class (K) to at most {max(2, batch // 2)}: the dataset's {n_images} training "
           "images cap the batch, so a bigger batch size cannot help" if capped
           else "lower samples_per_class (K) or raise batch_size")
    if batch < samples_per_class:
        raise ValueError(f"a batch of {batch} cannot hold one class of {samples_per_class} images; {fix}")
    classes_per_batch = min(batch // samples_per_class, n_classes)
    if classes_per_batch < 2 <= n_classes:
        raise ValueError(f"a batch of {batch} with {samples_per_class} images per class holds a single class, "
                         f"so no anchor has a negative; {fix}")
    classes_per_batch = max(classes_per_batch, 1)
    return classes_per_batch, max(samples_per_class, batch // classes_per_batch)


class RandomSampler:
    """Batches of a random permutation (unlabeled data, two-view runs, or sampler="random")."""

    def __init__(self, n: int, batch_size: int) -> None:
        if n < 1:
            raise ValueError("there are no training images")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.steps_per_epoch = max(1, n // self.batch_size)

    def epoch(self, rng: np.random.Generator) -> np.ndarray:
        """(steps_per_epoch, batch_size) int64 positions, each image at most once."""
        order = rng.permutation(self.n)
        return order[: self.steps_per_epoch * self.batch_size].reshape(self.steps_per_epoch, self.batch_size)


def make_sampler(kind: str, labels: np.ndarray | None, n: int, batch_size: int, samples_per_class: int):
    """The sampler a run asks for. kind: "pk" (needs labels) or "random". A batch never holds
    more than the n training images."""
    if kind == "pk":
        if labels is None:
            raise ValueError("the P×K sampler needs class labels; this run has none (use sampler random)")
        return ClassBalancedSampler(labels, min(batch_size, n), samples_per_class)
    if kind == "random":
        return RandomSampler(n, batch_size)
    raise ValueError(f"sampler must be one of: pk, random; got {kind!r}")
