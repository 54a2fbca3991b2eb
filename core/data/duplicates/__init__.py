"""Duplicate images and train/test leakage: exact copies, near copies, and what they do to a split.

Three questions about a dataset, asked of its pixels (or, with a run, of its embeddings):

- **Exact copies**: images whose decoded pixel arrays are identical (a hash of each stored array).
  An import stores an identical file once (the images table's sha256 is the hash of the decoded
  picture before it is shrunk, core.data.images.content_hash), but two different files can shrink
  to the same stored pixels, and the built-in datasets keep every image they ship as its own row
  (their sha256 column holds a checksum with the position appended), so copies can be stored.
- **Near copies**: pairs closer than a threshold, joined into groups (connected components: a
  union-find over the pairs). Without a run, the distance is between pixel descriptors that
  ignore a one-pixel shift and survive JPEG re-encoding (below); with a run, it is the euclidean
  distance between the run's L2-normalised embeddings.
- **Leakage**: test images with a copy (exact, or near within the threshold) in the training
  split; retrieval metrics computed on them are inflated. And groups whose members disagree on
  their label (one of them is probably mislabelled).

**The pixel descriptor.** The image in grey, sampled on a 16 × 16 grid with a Gaussian of σ = half
a grid cell, over the image less a one-pixel border; then mean-centred and L2-normalised, so a
brighter or higher-contrast copy matches too (an image of one flat colour has no direction and
describes as zero: flat images all match each other). The distance between two images is the
smallest euclidean distance between one's descriptor and the other's taken over a window moved
by up to one pixel in each direction (9 offsets; one image's 5 offsets against the other's plain
descriptor, both ways round). A copy shifted by one pixel, whatever fills the new edge, is then at
distance 0, because the window moved with it.

Measured on Fashion-MNIST's 70,000 images (28 × 28): a copy re-encoded as JPEG lies at median
0.008 (quality 90), 0.018 (75), 0.032 (50); at most 0.042 at quality 90, and 99% of copies at quality
75 lie within 0.053 (5,000 images each). Pairs of distinct images in the dataset: 88 pairs within 0.05
(mostly the same garment photographed twice, and near-identical plain trousers), 418 within 0.07
and 7,670 within 0.1, where plain trousers and shirts of the same cut chain into groups of
hundreds. So the default threshold is PIXEL_THRESHOLD = 0.05: every shifted copy, every JPEG at
quality 90 and most at 75, few look-alikes. Finer grids were less discriminating per unit of JPEG
noise (28 × 28: 1% of images have a different image within 0.11 while JPEG at 75 reaches 0.12),
coarser ones confuse distinct garments (8 × 8: 1% within 0.027).

**By a run's embeddings** the encoder decides what is near. On a one-epoch small CNN of
Fashion-MNIST (Precision@1 0.858), a JPEG copy at quality 75 moved median 0.036 and a one-pixel
shift 0.12, while half the images have another within 0.040: such an encoder does not see copies
as closer than look-alikes, so the embedding threshold finds what it cannot tell apart. The
default EMBEDDING_THRESHOLD = 0.01 gave 234 groups (1,134 images) there; 0.005 gave 16, 0.02 gave 1,112.

Cost on the 2-core dev machine (load average 4.6, bench/duplicates.py): Fashion-MNIST's 70,000
images by pixels 7.1 s (6.8 CPU-s: descriptors, the exact range search of near_pairs, the groups);
by 128-dimensional embeddings 3.4–3.9 CPU-s.

Modules: pixels (hashes and the descriptor), near_pairs (the range search), finding (groups as
positions), report (names, labels, splits, leakage, exclusions).
"""
from core.data.duplicates.finding import (EMBEDDING_THRESHOLD, PIXEL_THRESHOLD, Finding, check_threshold,
                                          find_in_embeddings, find_in_pixels, near_groups)
from core.data.duplicates.near_pairs import NearPairs, TooManyPairs, pairs_within
from core.data.duplicates.pixels import (DESCRIPTOR_VERSION, OFFSETS, descriptor_sets, exact_groups, pixel_descriptors,
                                         pixel_distance, representatives)
from core.data.duplicates.report import (EXCLUSIONS, DuplicateReport, Group, Member, leaked_test,
                                         positions_to_exclude, report)

__all__ = ["DESCRIPTOR_VERSION", "EMBEDDING_THRESHOLD", "EXCLUSIONS", "OFFSETS", "PIXEL_THRESHOLD", "DuplicateReport",
           "Finding", "Group", "Member", "NearPairs", "TooManyPairs", "check_threshold", "descriptor_sets",
           "exact_groups", "find_in_embeddings", "find_in_pixels", "leaked_test", "near_groups", "pairs_within",
           "pixel_descriptors", "pixel_distance", "positions_to_exclude", "report", "representatives"]
