"""Anomaly-map plumbing shared by the detectors: upsampling and Gaussian blur."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
