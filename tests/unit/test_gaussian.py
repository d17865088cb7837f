"""The Gaussian statistics against direct NumPy/SciPy/scikit-learn computations."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf

from adqueue.detectors.components.gaussian import (
    GaussianScorer,
    LevelGaussians,
    fit_gaussian,
    opca_basis,
    out_of_fold_distances,
)


def _data(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Samples whose covariance has known eigenvalues 10, 5, 2, 0.5, 0.1 along random axes."""
    eigen = np.array([10.0, 5.0, 2.0, 0.5, 0.1])
    axes, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    samples = rng.normal(size=(n, 5)) * np.sqrt(eigen) @ axes.T + 3.0
    return samples, axes


def test_mahalanobis_matches_scipy_with_all_components() -> None:
    rng = np.random.default_rng(0)
    train, _ = _data(rng)
    test = rng.normal(size=(20, 5)) * 3 + 3
    scorer = GaussianScorer.fit(train, None)
    precision = LedoitWolf().fit(train).precision_
    mean = train.mean(axis=0)
    expected = [mahalanobis(x, mean, precision) for x in test]
    got = scorer(torch.from_numpy(test).float()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_opca_keeps_the_least_variance_components() -> None:
    rng = np.random.default_rng(1)
    train, axes = _data(rng, n=20000)
    # 0.1 + 0.5 = 0.6 of 17.6 total is 3.4%: a 5% budget keeps exactly those two directions.
    basis = opca_basis(train, 0.05)
    assert basis.shape == (5, 2)
    np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-10)
    small = axes[:, [4, 3]]  # the true 0.1 and 0.5 axes
    overlap = np.abs(small.T @ basis)
    assert overlap.max(axis=1).min() > 0.99
    assert opca_basis(train, 0.001).shape == (5, 1)  # never fewer than one component
    assert opca_basis(train, None).shape == (5, 5)


def test_opca_distance_is_mahalanobis_in_the_kept_subspace() -> None:
    rng = np.random.default_rng(2)
    train, _ = _data(rng)
    test = rng.normal(size=(10, 5)) + 3
    mean, basis, precision = fit_gaussian(train, 0.05)
    projected = (train - mean) @ basis
    lw = LedoitWolf(assume_centered=True).fit(projected)
    expected = [mahalanobis((x - mean) @ basis, np.zeros(basis.shape[1]), lw.precision_) for x in test]
    got = GaussianScorer.fit(train, 0.05)(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    np.testing.assert_allclose(precision, lw.precision_)


def test_map_distances_in_float32_match_scipy_at_every_location() -> None:
    rng = np.random.default_rng(3)
    # Features far from zero, as ReLU maps are: the float32 product must not lose the distance
    # to the difference f @ W - mean @ W.
    train, _ = _data(rng)
    train = train + 40.0
    scorer = GaussianScorer.fit(train, 0.6)
    mean, basis, precision = fit_gaussian(train, 0.6)
    maps = torch.from_numpy(rng.normal(size=(2, 5, 3, 4)) * 3 + 43.0).float()  # [B, D, h, w]
    got = scorer.map_distances(maps)
    assert got.shape == (2, 3, 4) and got.dtype == torch.float32
    vectors = maps.double().permute(0, 2, 3, 1).numpy()
    expected = [[[mahalanobis((vectors[b, y, x] - mean) @ basis, np.zeros(basis.shape[1]), precision)
                  for x in range(4)] for y in range(3)] for b in range(2)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_scorer_state_round_trip_restores_shapes() -> None:
    rng = np.random.default_rng(3)
    train, _ = _data(rng)
    fitted = GaussianScorer.fit(train, 0.05)
    fresh = GaussianScorer()
    fresh.load_state_dict(fitted.state_dict())
    probe = torch.from_numpy(rng.normal(size=(4, 5)))
    assert torch.equal(fresh(probe), fitted(probe))


def test_fit_needs_two_samples() -> None:
    with pytest.raises(ValueError):
        fit_gaussian(np.zeros((1, 3)), None)


def test_out_of_fold_distances_score_each_row_with_gaussians_fitted_without_it() -> None:
    """With one fold per row it is leave-one-out, checked row by row by brute force, on two levels."""
    rng = np.random.default_rng(3)
    per_level = [rng.normal(size=(30, 6)), rng.normal(size=(30, 4)) * [1.0, 2.0, 0.5, 3.0]]
    got = out_of_fold_distances(per_level, 0.5, folds=30, seed=1)
    for row in range(30):
        rest = [np.delete(level, row, axis=0) for level in per_level]
        expected = sum(GaussianScorer.fit(r, 0.5)(torch.from_numpy(level[row:row + 1])).item()
                       for r, level in zip(rest, per_level, strict=True))
        assert got[row] == pytest.approx(expected, rel=1e-9)
    in_sample = LevelGaussians(2).fit(per_level, 0.5)([torch.from_numpy(level) for level in per_level]).numpy()
    assert got.mean() > in_sample.mean()  # unseen rows fall farther: why the scale is measured out of fold
