"""Multivariate Gaussian statistics on deep features: OPCA, Ledoit-Wolf, Mahalanobis.

OPCA (Wang et al. 2022) is PCA turned around: keep the principal components with the *least*
variance, those whose eigenvalues add up to a given fraction of the total. Normal images barely
move along these directions, so a defect that does stands out. The Gaussian is then fitted in that
subspace with Ledoit-Wolf shrinkage, which keeps the covariance invertible when the training set
is small next to the feature dimension.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import Tensor, nn


def opca_basis(features: np.ndarray, variance_fraction: float | None) -> np.ndarray:
    """Orthonormal basis [D, K] of the least-variance principal components.

    `variance_fraction` is the share of the total variance the kept components may carry
    (the paper's default is 0.05); None keeps every component (the identity basis).
    """
    dim = features.shape[1]
    if variance_fraction is None or variance_fraction >= 1.0:
        return np.eye(dim)
    if not 0.0 < variance_fraction < 1.0:
        raise ValueError(f"variance fraction must be in (0, 1], not {variance_fraction}")
    centered = features - features.mean(axis=0, keepdims=True)
    covariance = centered.T @ centered / max(len(features) - 1, 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    cumulative = np.cumsum(eigenvalues) / max(eigenvalues.sum(), np.finfo(np.float64).tiny)
    keep = max(1, int(np.searchsorted(cumulative, variance_fraction, side="right")))
    return eigenvectors[:, :keep]


def fit_gaussian(
    features: np.ndarray, variance_fraction: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean [D], OPCA basis [D, K] and Ledoit-Wolf precision [K, K] of `features` [N, D]."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError("a Gaussian needs at least two training samples")
    mean = features.mean(axis=0)
    basis = opca_basis(features, variance_fraction)
    projected = (features - mean) @ basis
    estimator = LedoitWolf(assume_centered=True).fit(projected)
    return mean, basis, estimator.precision_


class GaussianScorer(nn.Module):
    """Mahalanobis distance to one fitted Gaussian, for feature vectors on the last axis.

    Statistics are kept and applied in float64: the least-variance directions OPCA keeps carry
    tiny differences that float32 cancellation would drown.
    """

    _BUFFERS = ("mean", "basis", "precision")
    mean: Tensor
    basis: Tensor
    precision: Tensor

    def __init__(self, dim: int = 0, kept: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("basis", torch.zeros(dim, kept, dtype=torch.float64))
        self.register_buffer("precision", torch.zeros(kept, kept, dtype=torch.float64))

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The kept dimension is only known after fitting: take the shapes from the saved state.
        for name in self._BUFFERS:
            saved = state_dict.get(prefix + name)
            if saved is not None:
                self._buffers[name] = torch.empty_like(saved, dtype=torch.float64, device=self.mean.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def fit(cls, features: np.ndarray, variance_fraction: float | None) -> GaussianScorer:
        mean, basis, precision = fit_gaussian(features, variance_fraction)
        scorer = cls(basis.shape[0], basis.shape[1])
        scorer.mean.copy_(torch.from_numpy(mean))
        scorer.basis.copy_(torch.from_numpy(basis))
        scorer.precision.copy_(torch.from_numpy(precision))
        return scorer

    @property
    def kept(self) -> int:
        return int(self.basis.shape[1])

    def whitening(self) -> tuple[Tensor, Tensor]:
        """W [D, K] and offset [K] with |f @ W - offset|^2 the squared distance of f: the basis times
        the precision's Cholesky factor L (precision = L L^T), so that scoring is one matrix product
        (the basis, then the precision, then a product with itself were two, and 3x the time on
        mvg's maps). A precision that is not positive definite (never from Ledoit-Wolf) gets its
        symmetric square root instead."""
        factor, info = torch.linalg.cholesky_ex(self.precision)
        if int(info):
            values, vectors = torch.linalg.eigh(self.precision)
            factor = vectors * values.clamp_min(0.0).sqrt()
        whiten = self.basis @ factor
        return whiten, self.mean @ whiten

    def forward(self, features: Tensor) -> Tensor:
        """Mahalanobis distance (not squared) for `features` [..., D] -> [...]."""
        whiten, offset = self.whitening()
        flat = features.reshape(-1, features.shape[-1]).to(torch.float64)
        # f @ W - mean @ W: in float64 the difference of the two loses nothing that matters, and
        # it spares a centered copy of every feature vector.
        z = torch.addmm(offset, flat, whiten, beta=-1.0)
        squared = z.square_().sum(dim=-1).reshape(features.shape[:-1])
        return squared.clamp_min(0.0).sqrt().to(features.dtype)

    def map_distances(self, features: Tensor) -> Tensor:
        """Mahalanobis distance at every location of a feature map [B, D, h, w] -> [B, h, w]: the
        same as forward on the [B, h, w, D] view, without making every location's vector contiguous
        first (a copy as large as the map, and most of the time this took).

        In the features' own precision (float32), unlike the image distances: a map only ranks
        locations within an image, and a float64 copy of every map plus a float64 product was a
        third of the pipeline's work besides the backbone (and is slow on most GPUs). Whitened
        coordinates are unit-scale, so f @ W - mean @ W loses about 1e-6 of a distance in float32."""
        batch, dim, height, width = features.shape
        whiten, offset = (part.to(features.dtype) for part in self.whitening())
        wide = features.reshape(batch, dim, height * width)
        z = torch.matmul(whiten.T, wide).sub_(offset[:, None])  # [B, K, h*w]
        squared = z.square_().sum(dim=1).reshape(batch, height, width)
        return squared.clamp_min_(0.0).sqrt_()


class LevelGaussians(nn.ModuleList):
    """One GaussianScorer per feature level; an image's distance is the sum over its levels."""

    def __init__(self, count: int) -> None:
        super().__init__(GaussianScorer() for _ in range(count))

    def __iter__(self) -> Iterator[GaussianScorer]:  # ModuleList's own says Module: callers read `.kept`
        return cast(Iterator[GaussianScorer], super().__iter__())

    @property
    def fitted(self) -> bool:
        return all(scorer.kept > 0 for scorer in self)

    def fit(self, per_level: Sequence[np.ndarray], variance_fraction: float | None) -> LevelGaussians:
        """Fit level i on `per_level[i]` [N, D_i] in place; returns self."""
        for index, features in enumerate(per_level):
            self[index] = GaussianScorer.fit(features, variance_fraction)
        return self

    def forward(self, per_level: Sequence[Tensor]) -> Tensor:
        """Summed Mahalanobis distances of `per_level[i]` [..., D_i] -> [...]."""
        return sum((scorer(features) for scorer, features in zip(self, per_level, strict=True)),
                   torch.zeros((), dtype=per_level[0].dtype, device=per_level[0].device))


def out_of_fold_distances(per_level: Sequence[np.ndarray], variance_fraction: float | None, *, folds: int,
                          seed: int) -> np.ndarray:
    """Each row's summed distance under Gaussians fitted without its fold: how far unseen normal
    images fall, which in-sample distances understate (the fit has seen them)."""
    count = len(per_level[0])
    fold_of = np.random.default_rng(seed).permutation(count) % folds
    distances = np.empty(count)
    for fold in range(folds):
        held = fold_of == fold
        gaussians = LevelGaussians(len(per_level)).fit([f[~held] for f in per_level], variance_fraction)
        distances[held] = gaussians([torch.from_numpy(f[held]) for f in per_level]).numpy()
    return distances
