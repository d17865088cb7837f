"""Synthetic defects painted into defect-free images, for a training self-check with no labeled defects.

Four kinds, each one region of a few percent of the image:

- cutpaste: a rectangle cut from another image of the set and pasted at another place (CutPaste,
  Li et al., CVPR 2021, without its color jitter: the seam and the misplaced texture are the defect);
- scratch: a thin, slightly curved line much darker or lighter than what it crosses;
- blob: an irregular filled shape of another intensity, with a smooth texture of its own;
- blur: an elliptical spot blurred out of focus, feathered into its surroundings.

A cutpaste or blur goes to the most visible of a few candidate places: on a plain background
neither changes anything, and a defect nobody could see would only add noise to the check.

Every random draw for image `index` comes from a generator seeded with (seed, index), so a seed
paints the same defects whatever the batching. Each painted image comes with the mask of the
pixels its defect may have changed; pixels outside it are left exactly as they were.

Here, beside the loader, because these are images, not a detector: plain tensor ops on float
[C, H, W] in [0, 1] that know nothing of files, SQL or models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("cutpaste", "scratch", "blob", "blur")
PLACEMENTS = 4  # candidate places of a cutpaste or blur, the most visible kept


@dataclass
class Painted:
    images: Tensor  # [B, C, H, W], the input's dtype and device, in [0, 1]
    masks: Tensor  # [B, H, W] bool: where each image's defect may have changed pixels


def paint(images: Tensor, kinds: Sequence[str], *, seed: int, indices: Sequence[int] | None = None,
          donors: Tensor | None = None) -> Painted:
    """Paint `kinds[i]` into a copy of `images[i]` (float [B, C, H, W] in [0, 1]).

    `indices[i]` (default i) picks image i's random draws, with `seed`; `donors[i]` is the image
    a cutpaste patch of image i comes from (default: the next image of the batch, or itself alone).
    """
    if not images.is_floating_point() or images.dim() != 4:
        raise ValueError(f"expected float images [B, C, H, W], got {images.dtype} {list(images.shape)}")
    if len(kinds) != len(images):
        raise ValueError(f"{len(kinds)} defect kinds for {len(images)} images")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown defect kind(s) {unknown}: known are {', '.join(KINDS)}")
    indices = list(range(len(images))) if indices is None else list(indices)
    if donors is None:
        donors = images.roll(-1, dims=0)
    out, masks = [], []
    for image, donor, kind, index in zip(images, donors, kinds, indices, strict=True):
        generator = torch.Generator().manual_seed(_image_seed(seed, index))
        painted, mask = PAINTERS[kind](image.float().cpu(), donor.float().cpu(), generator)
        out.append(painted.clamp_(0.0, 1.0))
        masks.append(mask)
    return Painted(torch.stack(out).to(images.dtype).to(images.device), torch.stack(masks).to(images.device))


def _image_seed(seed: int, index: int) -> int:
    """Independent streams per (seed, index), unlike seed + index which overlap between seeds."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _grid(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Pixel-center coordinates (y, x), each [H, W]."""
    ys = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    xs = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    return ys, xs


def _contrasting(level: float, step: float) -> float:
    """A level `step` away from `level`, toward the end of [0, 1] with more room."""
    return max(0.0, level - step) if level > 0.5 else min(1.0, level + step)


def _blend(image: Tensor, value: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """image where alpha is 0, value where it is 1; the mask is alpha > 0, the rest kept exactly."""
    mask = alpha > 0
    mixed = image * (1 - alpha) + value * alpha
    return torch.where(mask, mixed, image), mask


def cutpaste(image: Tensor, donor: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    _, height, width = image.shape
    area = _uniform(generator, 0.02, 0.06) * height * width
    aspect = math.exp(_uniform(generator, math.log(0.3), math.log(1 / 0.3)))
    h = int(min(max(round(math.sqrt(area * aspect)), 2), height - 1))
    w = int(min(max(round(math.sqrt(area / aspect)), 2), width - 1))
    # Of a few placements the one that changes the image most: a patch pasted onto the same plain
    # background (a black border, say) changes nothing and is no defect.
    best = -1.0
    for _ in range(PLACEMENTS):
        y, x, v, u = (int(torch.randint(0, n, (), generator=generator)) for n in (height - h + 1, width - w + 1) * 2)
        change = float((donor[:, y:y + h, x:x + w] - image[:, v:v + h, u:u + w]).abs().mean())
        if change > best:
            best, (sy, sx, ty, tx) = change, (y, x, v, u)
    out = image.clone()
    out[:, ty:ty + h, tx:tx + w] = donor[:, sy:sy + h, sx:sx + w]
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[ty:ty + h, tx:tx + w] = True
    return torch.where(mask, out, image), mask


def scratch(image: Tensor, donor: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    _, height, width = image.shape
    side = min(height, width)
    length = _uniform(generator, 0.3, 0.6) * side
    angle = _uniform(generator, 0.0, math.pi)
    cy, cx = _uniform(generator, 0.25, 0.75) * height, _uniform(generator, 0.25, 0.75) * width
    bend = _uniform(generator, -0.15, 0.15) * length  # a quadratic Bezier's control point, off the chord
    half_width = max(0.75, _uniform(generator, 0.003, 0.008) * side)
    strength = _uniform(generator, 0.8, 1.0)
    step = _uniform(generator, 0.3, 0.5)
    direction = torch.tensor([math.sin(angle), math.cos(angle)])
    normal = torch.tensor([float(direction[1]), -float(direction[0])])
    center = torch.tensor([cy, cx])
    start, end, control = center - direction * length / 2, center + direction * length / 2, center + normal * bend
    t = torch.linspace(0, 1, 17)[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end  # [17, 2]: a polyline
    # Distances only within the curve's bounding box: the rest of the image is too far to change.
    low, high = points.amin(dim=0) - half_width - 1, points.amax(dim=0) + half_width + 2
    y0, x0 = max(0, math.floor(float(low[0]))), max(0, math.floor(float(low[1])))
    y1, x1 = min(height, math.ceil(float(high[0]))), min(width, math.ceil(float(high[1])))
    ys, xs = _grid(y1 - y0, x1 - x0)
    pixels = torch.stack([ys + y0, xs + x0], dim=-1)[None]  # [1, h, w, 2]
    a, b = points[:-1, None, None, :], points[1:, None, None, :]  # segments [16, 1, 1, 2]
    along = ((pixels - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1).clamp_min(1e-9)
    distance = (pixels - (a + along.clamp(0, 1)[..., None] * (b - a))).norm(dim=-1).amin(dim=0)
    alpha = torch.zeros(height, width)
    alpha[y0:y1, x0:x1] = (half_width + 0.5 - distance).clamp(0, 1) * strength  # anti-aliased edges
    level = _contrasting(float(image.mean(dim=0)[alpha > 0].mean()), step)  # against what it crosses
    return _blend(image, torch.full_like(image, level), alpha)


def blob(image: Tensor, donor: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    _, height, width = image.shape
    radius = math.sqrt(_uniform(generator, 0.015, 0.05) * height * width / math.pi)
    cy = _uniform(generator, min(1.3 * radius, height / 2), max(height - 1.3 * radius, height / 2))
    cx = _uniform(generator, min(1.3 * radius, width / 2), max(width - 1.3 * radius, width / 2))
    ys, xs = _grid(height, width)
    theta = torch.atan2(ys - cy, xs - cx)
    outline = torch.ones_like(theta)  # a circle wobbled by a few random harmonics: irregular, star-shaped
    for k in range(2, 6):
        outline += _uniform(generator, 0.0, 0.6) / k * torch.cos(k * theta + _uniform(generator, 0, 2 * math.pi))
    edge = radius * outline.clamp_min(0.3)
    alpha = (edge + 0.5 - ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()).clamp(0, 1)
    level = _contrasting(float(image.mean(dim=0)[alpha > 0].mean()), _uniform(generator, 0.15, 0.35))
    coarse = torch.rand(1, 1, 8, 8, generator=generator) - 0.5  # a texture of its own, smoother than noise
    texture = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    value = level + texture * _uniform(generator, 0.1, 0.3)  # no tint: grey images stay grey
    return _blend(image, value.expand_as(image), alpha * _uniform(generator, 0.75, 1.0))


def blur(image: Tensor, donor: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    _, height, width = image.shape
    area = _uniform(generator, 0.03, 0.08) * height * width
    aspect = math.exp(_uniform(generator, math.log(0.5), math.log(2.0)))
    ry, rx = math.sqrt(area / math.pi * aspect), math.sqrt(area / math.pi / aspect)
    sigma = max(1.0, _uniform(generator, 0.01, 0.025) * min(height, width))
    # Of a few places the most detailed: blurring a plain area changes nothing and is no defect.
    best = -1.0
    for _ in range(PLACEMENTS):
        y = _uniform(generator, min(ry, height / 2), max(height - ry, height / 2))
        x = _uniform(generator, min(rx, width / 2), max(width - rx, width / 2))
        spot = image[:, max(0, int(y - ry)):int(y + ry) + 1, max(0, int(x - rx)):int(x + rx) + 1]
        detail = float(spot.diff(dim=-1).abs().mean() + spot.diff(dim=-2).abs().mean())
        if detail > best:
            best, cy, cx = detail, y, x
    ys, xs = _grid(height, width)
    rho = (((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2).sqrt()
    alpha = ((1 - rho) / 0.25).clamp(0, 1)  # feathered: no sharp seam where the focus changes
    # Blurred only around the spot (its box plus the kernel's reach), not the whole image.
    reach = int(3 * sigma) + 2
    y0, y1 = max(0, int(cy - ry) - reach), min(height, int(cy + ry) + reach)
    x0, x1 = max(0, int(cx - rx) - reach), min(width, int(cx + rx) + reach)
    blurred = image.clone()
    blurred[:, y0:y1, x0:x1] = _gaussian_blur(image[:, y0:y1, x0:x1], sigma)
    return _blend(image, blurred, alpha)


def _gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [C, H, W], edges reflected."""
    radius = max(1, min(int(3 * sigma + 0.5), min(image.shape[-2:]) - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]


Painter = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]
PAINTERS: dict[str, Painter] = {"cutpaste": cutpaste, "scratch": scratch, "blob": blob, "blur": blur}
