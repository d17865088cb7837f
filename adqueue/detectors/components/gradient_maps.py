"""Gradient maps: how much each input pixel moves a per-image score, and their reductions.

DifferNet back-propagates its negative log-likelihood to the pixels; the EBM back-propagates its
energy; encoder_flow its latent NLL. All three need the same pieces: the input gradient itself
(even when the caller is inside `torch.no_grad()`), per-pixel standardization with statistics of
normal images, and L1/L2 norms over channels (a map) and over pixels (an image score).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adqueue.detectors.components.maps import gaussian_blur


def input_gradient(score: Callable[[Tensor], Tensor], images: Tensor) -> tuple[Tensor, Tensor]:
    """(scores [B], d scores / d images [B, C, H, W]) for a per-image score function.

    Samples are independent, so the gradient of the summed scores is each sample's own gradient.
    Parameter gradients are not accumulated.
    """
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        values = score(x)
        if values.dim() != 1 or values.shape[0] != x.shape[0]:
            raise ValueError(f"score function must return [B] values, got {tuple(values.shape)}")
        (grad,) = torch.autograd.grad(values.sum(), x)
    return values.detach(), grad.detach()


def channel_norm(grad: Tensor, p: int = 2) -> Tensor:
    """Per-pixel L1 or L2 norm over channels: [B, C, H, W] -> [B, H, W]."""
    return torch.linalg.vector_norm(grad, ord=p, dim=1)


def image_norm(maps: Tensor, p: int = 2) -> Tensor:
    """L1 or L2 norm over all pixels of [B, H, W] maps -> [B]."""
    return torch.linalg.vector_norm(maps.flatten(1), ord=p, dim=1)


def standardize(grad: Tensor, mean: Tensor, std: Tensor, eps: float = 1e-12) -> Tensor:
    """(g - mean) / std per pixel and channel, with [C, H, W] statistics of normal images."""
    return (grad - mean) / (std + eps)


def blurred_abs_sum(grad: Tensor, sigma: float) -> Tensor:
    """DifferNet's map: Gaussian-blur each channel's gradient, take |.|, sum over channels."""
    return gaussian_blur(grad, sigma).abs().sum(dim=1)


class RunningMoments:
    """Per-element mean and standard deviation over a stream of [B, ...] batches (Welford, float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self._m2: Tensor | None = None

    def update(self, batch: Tensor) -> None:
        batch = batch.detach().to(torch.float64)
        n = batch.shape[0]
        batch_mean = batch.mean(dim=0)
        batch_m2 = ((batch - batch_mean) ** 2).sum(dim=0)
        if self.mean is None or self._m2 is None:
            self.count, self.mean, self._m2 = n, batch_mean, batch_m2
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self._m2 = self._m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    def std(self) -> Tensor:
        if self._m2 is None or self.count < 2:
            raise ValueError("need at least two samples for a standard deviation")
        return (self._m2 / (self.count - 1)).sqrt()
