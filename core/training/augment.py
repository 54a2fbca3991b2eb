"""Self-supervised views: two augmented views per image, made on the device in batches; and the
lighter augmentation of a label-supervised batch (augment_batch: flips and erased squares).

SimCLR's recipe scaled to small images: random resized crop, horizontal flip, colour jitter
(brightness, contrast, saturation, hue) and random grayscale for colour images, brightness and
contrast for grey ones, and gaussian blur. Every random draw comes from the generator passed in,
so a seeded generator gives the same views.

torch is imported inside the functions: the Train page imports this module for
`resolve_supervision` and the preview, and pages never import torch when they load.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from models.widths import augment_problem

if TYPE_CHECKING:
    import torch

CROP_SCALE = (0.3, 1.0)  # fraction of the image's area a crop keeps
CROP_RATIO = (3 / 4, 4 / 3)
JITTER_PROBABILITY = 0.8
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}  # SimCLR's strength 0.5
GRAYSCALE_PROBABILITY = 0.2
BLUR_PROBABILITY = 0.5
# augment_batch (a label-supervised run's "augment" setting, models.widths.AUGMENTS): each draw
# applies to an image with this probability; an erased square's side is this fraction of the
# image's shorter side (9 px of Fashion-MNIST's 28), filled with mid-grey (0 in [-1, 1]), its centre
# anywhere in the image (cut at the border), as random erasing (Zhong et al., 2020) and cutout do.
# Measured on Fashion-MNIST (bench/quality.py): flips and erasing lift MAP@R; shifted crops lower it.
AUGMENT_PROBABILITY = 0.5
ERASE_FRACTION = 1 / 3
# RGB → YIQ; a hue shift is a rotation of the (I, Q) chroma plane
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_LUMA = (0.299, 0.587, 0.114)


def resolve_supervision(supervision: str, loss: str, labeled: bool) -> str:
    """"labels" (positives share a class) or "self" (two views of an image are the positive pair).

    auto: labels when the dataset has them and the objective is not self-supervised (InfoNCE;
    core.metric.registry), else self. "self" forces two views on labeled data (a self-supervised
    baseline); "labels" needs labels and an objective that uses them.
    """
    from core.metric import registry

    self_supervised = registry.objective(loss).self_supervised
    if supervision == "auto":
        return "labels" if labeled and not self_supervised else "self"
    if supervision == "labels":
        if not labeled:
            raise ValueError("supervision 'labels' needs a labeled dataset; this one has no classes (use auto or self)")
        if self_supervised:
            raise ValueError(f"{registry.objective(loss).title} learns from two views of each image, not from labels; "
                             "use supervision auto or self, or the supcon loss for labels")
        return "labels"
    if supervision == "self":
        return "self"
    raise ValueError(f"supervision must be one of: auto, labels, self; got {supervision!r}")


def random_views(x: "torch.Tensor", generator: Optional["torch.Generator"] = None, flip: bool = True) -> "torch.Tensor":
    """One random view of each image. x: (B, C, H, W) float in [-1, 1], C = 1 or 3; same shape,
    dtype and range out. Colour jitter and grayscale apply when C = 3."""
    b, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    out = _resized_crop_and_flip(x, generator, flip)
    out = (out.float() + 1) / 2  # colour maths in [0, 1]
    out = _colour_jitter(out, generator) if c == 3 else _grey_jitter(out, generator)
    out = _gaussian_blur(out, generator)
    return (out * 2 - 1).clamp_(-1.0, 1.0).to(x.dtype)


def two_views(x: "torch.Tensor", generator: Optional["torch.Generator"] = None, flip: bool = True) -> "torch.Tensor":
    """(2B, C, H, W): rows i and i + B are two views of image i."""
    import torch

    return torch.cat([random_views(x, generator, flip), random_views(x, generator, flip)])


def augment_batch(x: "torch.Tensor", augment: str, generator: Optional["torch.Generator"] = None) -> "torch.Tensor":
    """A label-supervised batch as a run with `augment` ("none", "flip", "erase", "flip+erase")
    trains on it. x: (B, C, H, W) float in [-1, 1]; the same shape, dtype and range out. Every draw
    comes from `generator` (on x's device), so a seeded generator gives the same batch."""
    import torch

    problem = augment_problem(augment)
    if problem:
        raise ValueError(problem)
    kinds = set(augment.split("+"))
    b, _, h, w = x.shape
    if "flip" in kinds:
        x = torch.where(_chance(b, AUGMENT_PROBABILITY, x, generator).view(b, 1, 1, 1), x.flip(-1), x)
    if "erase" in kinds:
        half = max(1, round(min(h, w) * ERASE_FRACTION)) / 2
        cy = torch.randint(h, (b, 1, 1), device=x.device, generator=generator)
        cx = torch.randint(w, (b, 1, 1), device=x.device, generator=generator)
        apply = _chance(b, AUGMENT_PROBABILITY, x, generator).view(b, 1, 1)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        square = ((rows - cy).abs() < half) & ((cols - cx).abs() < half) & apply
        x = x.masked_fill(square[:, None], 0.0)
    return x


def augmented_pairs(pixels: np.ndarray, n: int = 6, seed: int = 0) -> np.ndarray:
    """What two-view training sees: (n, 2, H, W, C) uint8 views of n images drawn with `seed`.

    pixels: (N, H, W, C) uint8, C = 1 or 3 (a memory map is fine). Made on the CPU with the
    same `two_views` training uses.
    """
    import torch

    from models.encoders import to_input

    if len(pixels) == 0:
        raise ValueError("there are no images to augment")
    rows = np.sort(np.random.default_rng(seed).choice(len(pixels), min(n, len(pixels)), replace=False))
    images = torch.from_numpy(np.array(pixels[rows]))  # a copy: the array may be a read-only memory map
    channels = images.shape[3]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        views = two_views(to_input(images, channels), generator)
    as_uint8 = ((views + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    first, second = as_uint8.split(len(rows))
    pairs = torch.stack([first, second], dim=1)  # (n, 2, C, H, W)
    return pairs.permute(0, 1, 3, 4, 2).contiguous().numpy()


def _uniform(b: int, low: float, high: float, x: "torch.Tensor", generator) -> "torch.Tensor":
    import torch

    return torch.rand(b, device=x.device, generator=generator) * (high - low) + low


def _chance(b: int, p: float, x: "torch.Tensor", generator) -> "torch.Tensor":
    import torch

    return torch.rand(b, device=x.device, generator=generator) < p


def _resized_crop_and_flip(x: "torch.Tensor", generator, flip: bool) -> "torch.Tensor":
    """Random resized crop (area and aspect ratio from CROP_SCALE and CROP_RATIO) and a
    horizontal flip with probability 1/2, as one affine warp back to the input size."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    scale = _uniform(b, *CROP_SCALE, x, generator)
    ratio = torch.exp(_uniform(b, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), x, generator))
    sx = torch.sqrt(scale * ratio).clamp(max=1.0)
    sy = torch.sqrt(scale / ratio).clamp(max=1.0)
    tx = _uniform(b, -1.0, 1.0, x, generator) * (1 - sx)
    ty = _uniform(b, -1.0, 1.0, x, generator) * (1 - sy)
    sign = torch.ones(b, device=x.device)
    if flip:
        sign = torch.where(_chance(b, 0.5, x, generator), -sign, sign)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = sx * sign
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey_jitter(y: "torch.Tensor", generator) -> "torch.Tensor":
    """Brightness and contrast, with probability JITTER_PROBABILITY. y: (B, 1, H, W) in [0, 1]."""
    import torch

    b = y.shape[0]
    apply = _chance(b, JITTER_PROBABILITY, y, generator).view(b, 1, 1, 1)
    brightness = _uniform(b, 1 - JITTER["brightness"], 1 + JITTER["brightness"], y, generator).view(b, 1, 1, 1)
    contrast = _uniform(b, 1 - JITTER["contrast"], 1 + JITTER["contrast"], y, generator).view(b, 1, 1, 1)
    jittered = (y * brightness).clamp(0, 1)
    mean = jittered.mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((jittered - mean) * contrast + mean).clamp(0, 1)
    return torch.where(apply, jittered, y)


def _colour_jitter(y: "torch.Tensor", generator) -> "torch.Tensor":
    """Brightness, contrast, saturation and hue (with probability JITTER_PROBABILITY), then
    grayscale with probability GRAYSCALE_PROBABILITY. y: (B, 3, H, W) in [0, 1]."""
    import torch

    b = y.shape[0]
    luma = torch.tensor(_LUMA, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)

    def grey(image: "torch.Tensor") -> "torch.Tensor":
        return (image * luma).sum(dim=1, keepdim=True)

    apply = _chance(b, JITTER_PROBABILITY, y, generator).view(b, 1, 1, 1)
    brightness = _uniform(b, 1 - JITTER["brightness"], 1 + JITTER["brightness"], y, generator).view(b, 1, 1, 1)
    contrast = _uniform(b, 1 - JITTER["contrast"], 1 + JITTER["contrast"], y, generator).view(b, 1, 1, 1)
    saturation = _uniform(b, 1 - JITTER["saturation"], 1 + JITTER["saturation"], y, generator).view(b, 1, 1, 1)
    hue = _uniform(b, -JITTER["hue"], JITTER["hue"], y, generator) * 2 * math.pi  # fraction of a turn

    jittered = (y * brightness).clamp(0, 1)
    mean = grey(jittered).mean(dim=(2, 3), keepdim=True)
    jittered = ((jittered - mean) * contrast + mean).clamp(0, 1)
    jittered = ((jittered - grey(jittered)) * saturation + grey(jittered)).clamp(0, 1)
    jittered = _rotate_hue(jittered, hue)
    out = torch.where(apply, jittered, y)

    to_grey = _chance(b, GRAYSCALE_PROBABILITY, y, generator).view(b, 1, 1, 1)
    return torch.where(to_grey, grey(out).expand_as(out), out)


def _rotate_hue(y: "torch.Tensor", angle: "torch.Tensor") -> "torch.Tensor":
    """Rotate each image's chroma by `angle` radians in YIQ space: one 3×3 matrix per image."""
    import torch

    to_yiq = torch.tensor(_RGB_TO_YIQ, device=y.device, dtype=y.dtype)
    to_rgb = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(angle), 3, 3, device=y.device, dtype=y.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrix = to_rgb @ rotation @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", matrix, y).clamp(0, 1)


def _gaussian_blur(y: "torch.Tensor", generator) -> "torch.Tensor":
    """Separable gaussian blur with probability BLUR_PROBABILITY, sigma uniform in
    [0.1, sigma_max]; sigma_max is 1 px for small images and SimCLR's 2 px at 224 px, in scale.
    y: (B, C, H, W) in [0, 1]."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = y.shape
    side = min(h, w)
    sigma_max = max(1.0, 2.0 * side / 224)
    radius = min(math.ceil(2 * sigma_max), (side - 1) // 2)
    if radius < 1:
        return y
    sigma = _uniform(b, 0.1, sigma_max, y, generator)
    apply = _chance(b, BLUR_PROBABILITY, y, generator)
    offsets = torch.arange(-radius, radius + 1, device=y.device, dtype=y.dtype)
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(y.dtype).expand_as(kernel)
    kernel = torch.where(apply[:, None], kernel, identity)  # (B, 2r + 1)
    weights = kernel.repeat_interleave(c, dim=0)  # one kernel per image and channel
    flat = F.pad(y.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, weights.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(flat, weights.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)
