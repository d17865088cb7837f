"""Shared gradient-map pieces against direct computations."""

import numpy as np
import torch

from adqueue.detectors.components.gradient_maps import (
    RunningMoments,
    channel_norm,
    image_norm,
    input_gradient,
    standardize,
)
from adqueue.detectors.components.photometric import standardize_images


def test_input_gradient_is_per_sample_and_works_under_no_grad() -> None:
    weights = torch.randn(3, 4, 4)
    images = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        values, grad = input_gradient(lambda x: (x * weights).sum(dim=(1, 2, 3)) ** 2, images)
    expected = torch.stack([2 * (img * weights).sum() * weights for img in images])
    assert torch.allclose(grad, expected, atol=1e-5)
    assert torch.allclose(values, (images * weights).sum(dim=(1, 2, 3)) ** 2)


def test_norms_and_standardization_match_numpy() -> None:
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(5, 3, 6, 7))
    moments = RunningMoments()
    for chunk in np.array_split(grads, 3):
        moments.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(moments.mean.numpy(), grads.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(moments.std().numpy(), grads.std(axis=0, ddof=1), atol=1e-12)
    z = standardize(torch.from_numpy(grads), moments.mean, moments.std()).numpy()
    np.testing.assert_allclose(z, (grads - grads.mean(0)) / grads.std(0, ddof=1), atol=1e-9)
    l2 = channel_norm(torch.from_numpy(grads), 2).numpy()
    np.testing.assert_allclose(l2, np.sqrt((grads**2).sum(axis=1)))
    l1 = channel_norm(torch.from_numpy(grads), 1).numpy()
    np.testing.assert_allclose(l1, np.abs(grads).sum(axis=1))
    np.testing.assert_allclose(image_norm(torch.from_numpy(l2), 1).numpy(), l2.reshape(5, -1).sum(axis=1))


def test_photometric_standardization_removes_exposure() -> None:
    rng = np.random.default_rng(0)
    texture = torch.from_numpy(rng.uniform(0.3, 0.7, (1, 1, 16, 16))).float()
    darker_flatter = 0.4 * texture + 0.05  # the same tile under other lighting
    out = standardize_images(torch.cat([texture, darker_flatter]))
    assert torch.allclose(out[0], out[1], atol=1e-5)
    assert out.mean(dim=(1, 2, 3)).sub(0.5).abs().max() < 1e-5
    assert torch.allclose(out.std(dim=(1, 2, 3)), torch.full((2,), 0.15), atol=1e-5)
    flat = standardize_images(torch.full((1, 1, 4, 4), 0.8))  # no contrast: no division blow-up
    assert torch.isfinite(flat).all() and torch.allclose(flat, torch.full_like(flat, 0.5), atol=1e-4)
