"""Image transforms on batches of tensors: rotation, brightness and contrast, and their sets.

DifferNet trains on randomly transformed copies of each image and scores an image by averaging
over a fixed set of transforms; its anomaly maps are rotated back before they are averaged. The
transforms here work on float [B, C, H, W] tensors in [0, 1], are differentiable, and act on
square inputs (every detector resizes to a square first), so a rotation about the center is a
true rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Transforms:
    """One transform per entry: rotation in degrees (clockwise as displayed), brightness, contrast."""

    angles: Tensor  # [T]
    brightness: Tensor  # [T], multiplies the pixel values
    contrast: Tensor  # [T], scales the deviation from each image's mean

    def __len__(self) -> int:
        return int(self.angles.shape[0])

    def __getitem__(self, index: slice | Tensor) -> Transforms:
        return Transforms(self.angles[index], self.brightness[index], self.contrast[index])

    def apply(self, images: Tensor) -> Tensor:
        """Transform each image of [B, C, H, W] by its own entry (len(self) == B)."""
        images = jitter(images, self.brightness.to(images.device), self.contrast.to(images.device))
        return rotate(images, self.angles.to(images.device))

    def repeat(self, count: int) -> Transforms:
        """Each entry `count` times in a row, to apply one transform to a whole batch."""
        return Transforms(*(t.repeat_interleave(count) for t in (self.angles, self.brightness, self.contrast)))


def random_transforms(
    count: int, generator: torch.Generator, *, rotation: bool, brightness: float, contrast: float
) -> Transforms:
    """`count` transforms: angles uniform in [0, 360), factors uniform in [1 - x, 1 + x]."""
    angles = torch.rand(count, generator=generator) * 360.0 if rotation else torch.zeros(count)
    return Transforms(
        angles,
        1.0 + (torch.rand(count, generator=generator) * 2 - 1) * brightness,
        1.0 + (torch.rand(count, generator=generator) * 2 - 1) * contrast,
    )


def evenly_spread_transforms(
    count: int, seed: int, *, rotation: bool, brightness: float, contrast: float
) -> Transforms:
    """A fixed set for scoring: angles 360 k / count, seeded factors, the first one the identity.

    Evenly spaced angles cover the circle with less variance than random ones, and a fixed set
    makes an image's score independent of the batch it is in and of the host it runs on.
    """
    generator = torch.Generator().manual_seed(seed)
    transforms = random_transforms(count, generator, rotation=False, brightness=brightness, contrast=contrast)
    angles = torch.arange(count, dtype=torch.float32) * (360.0 / count) if rotation else torch.zeros(count)
    transforms.brightness[0] = transforms.contrast[0] = 1.0
    return Transforms(angles, transforms.brightness, transforms.contrast)


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image about its center by its own angle (`-angle` undoes it); corners become 0."""
    radians = torch.deg2rad(degrees.to(images.dtype))
    cos, sin, zero = torch.cos(radians), torch.sin(radians), torch.zeros_like(radians)
    # affine_grid maps output coordinates to input ones, so the inverse rotation goes in.
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def jitter(images: Tensor, brightness: Tensor, contrast: Tensor) -> Tensor:
    """torchvision's brightness then contrast adjustment, per image, clamped to [0, 1]."""
    scaled = (images * brightness[:, None, None, None]).clamp(0.0, 1.0)
    mean = scaled.mean(dim=(1, 2, 3), keepdim=True)
    return ((scaled - mean) * contrast[:, None, None, None] + mean).clamp(0.0, 1.0)


def identity_like(count: int) -> Transforms:
    return Transforms(torch.zeros(count), torch.ones(count), torch.ones(count))


def spread_indices(total: int, count: int) -> list[int]:
    """`count` indices evenly spread over range(total), starting at 0."""
    count = max(1, min(count, total))
    return sorted({math.floor(i * total / count) for i in range(count)})
