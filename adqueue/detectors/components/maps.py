"""Anomaly-map plumbing shared by the detectors: upsampling and Gaussian blur.

Upsampling (bilinear) and the blur (separable, with its edge padding) are both linear in the map,
and so is the mean over levels: `smooth_maps` applies them as two matrix products per level,
P [H, h] @ map [h, w] @ Q [w, W], with P and Q built once per shape by running the same two
operations on identity matrices. On mvg's three levels at 256 px that took a batch's maps from
248 ms of one core to 33 (the 33-tap convolution on the full-size maps was most of it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


def upsample_maps(maps: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """Stack [B, h_i, w_i] maps into [L, B, H, W] at `size`, bilinearly."""
    height, width = int(size[0]), int(size[1])
    return torch.stack(
        [
            F.interpolate(m[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            for m in maps
        ]
    )


def gaussian_kernel1d(sigma: float, device: torch.device | None = None) -> Tensor:
    radius = max(1, math.ceil(4.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [B, H, W] (or [B, C, H, W]) maps; sigma <= 0 is a no-op."""
    if sigma <= 0:
        return maps
    squeeze = maps.dim() == 3
    x = maps[:, None] if squeeze else maps
    channels = x.shape[1]
    kernel = gaussian_kernel1d(sigma, x.device).to(x.dtype)
    radius = (kernel.numel() - 1) // 2
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect" if x.shape[-1] > radius else "replicate")
    x = F.conv2d(x, horizontal, groups=channels)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect" if x.shape[-2] > radius else "replicate")
    x = F.conv2d(x, vertical, groups=channels)
    return x[:, 0] if squeeze else x


def smooth_maps(maps: Sequence[Tensor], size: Sequence[int], sigma: float) -> Tensor:
    """`gaussian_blur(upsample_maps(maps, size).mean(dim=0), sigma)`: [B, h_i, w_i] maps to one
    [B, H, W] map, computed as matrix products (see the module docstring)."""
    height, width = int(size[0]), int(size[1])
    total: Tensor | None = None
    for level in maps:
        rows, columns = _operators(level.shape[-2], level.shape[-1], height, width, float(sigma), level.device)
        smoothed = rows @ level.float() @ columns  # [H, h] @ [B, h, w] @ [w, W]
        total = smoothed if total is None else total.add_(smoothed)
    assert total is not None, "at least one map level"
    return total.div_(len(maps))


@lru_cache(maxsize=32)
def _operators(h: int, w: int, height: int, width: int, sigma: float,
               device: torch.device) -> tuple[Tensor, Tensor]:
    """P [H, h] and Q [w, W]: upsampling then blurring along each axis, as matrices."""
    with torch.no_grad():
        # Column j of P: the upsampled, blurred image of a unit impulse at row j (one column wide,
        # so the horizontal pass leaves it alone); likewise row i of Q.
        impulses = torch.eye(h, device=device)[:, :, None]  # [h, h, 1]: image j is e_j as a column
        up = F.interpolate(impulses[:, None], size=(height, 1), mode="bilinear", align_corners=False)[:, 0]
        rows = gaussian_blur(up, sigma)[:, :, 0].T.contiguous()  # [H, h]
        impulses = torch.eye(w, device=device)[:, None, :]  # [w, 1, w]: image i is e_i as a row
        up = F.interpolate(impulses[:, None], size=(1, width), mode="bilinear", align_corners=False)[:, 0]
        columns = gaussian_blur(up, sigma)[:, 0, :].contiguous()  # [w, W]
    return rows, columns
