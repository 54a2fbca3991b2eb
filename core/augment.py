"""Two augmented views per image, made on the device in batches (for InfoNCE and unlabeled runs)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_views(x: torch.Tensor, generator: torch.Generator | None = None, flip: bool = True) -> torch.Tensor:
    """One random view of each image. x: (B, C, H, W) float in [-1, 1]; same shape and range out.

    Random resized crop (scale 0.5–1, aspect 3/4–4/3) and horizontal flip as one affine warp,
    then brightness/contrast jitter and a little noise.
    """
    b, c, h, w = x.shape
    device = x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, device=device, generator=generator) * (high - low) + low

    scale = uniform(0.5, 1.0)
    log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(scale * ratio).clamp(max=1.0)
    sy = torch.sqrt(scale / ratio).clamp(max=1.0)
    tx = (uniform(-1.0, 1.0)) * (1 - sx)
    ty = (uniform(-1.0, 1.0)) * (1 - sy)
    sign = torch.ones(b, device=device)
    if flip:
        sign = torch.where(torch.rand(b, device=device, generator=generator) < 0.5, -sign, sign)
    theta = torch.zeros(b, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0] = sx * sign
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = uniform(-0.2, 0.2).view(b, 1, 1, 1).to(x.dtype)
    contrast = uniform(0.7, 1.3).view(b, 1, 1, 1).to(x.dtype)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    noise = torch.randn(out.shape, device=device, generator=generator, dtype=x.dtype) * 0.03
    return (out + noise).clamp_(-1.0, 1.0)


def two_views(x: torch.Tensor, generator: torch.Generator | None = None, flip: bool = True) -> torch.Tensor:
    """(2B, C, H, W): rows i and i + B are two views of image i."""
    return torch.cat([random_views(x, generator, flip), random_views(x, generator, flip)])
