"""Synthetic defects: seeded and deterministic, each one bounded region, images kept in [0, 1]."""

import numpy as np
import pytest
import torch

from adqueue.data.synthetic_defects import KINDS, paint
from adqueue.pipeline.self_check import MAX_DEFECTED, MIN_DEFECTED, _auroc, defect_plan


def images(n: int = 4, size: int = 96, channels: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Textured test images: smooth gradients plus seeded noise, so that every kind changes something."""
    generator = torch.Generator().manual_seed(123)
    ramp = torch.linspace(0.2, 0.7, size)
    base = (ramp[None, :] + ramp[:, None]) / 2
    noise = torch.rand(n, channels, size, size, generator=generator) * 0.2
    return (base + noise).clamp(0, 1).to(dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_only_a_bounded_region(kind: str) -> None:
    clean = images(6)
    painted = paint(clean, [kind] * 6, seed=0)
    changed = (painted.images != clean).any(dim=1)  # [B, H, W]
    assert not (changed & ~painted.masks).any()  # nothing outside the mask moved
    assert changed.flatten(1).any(dim=1).all()  # every image got its defect
    share = painted.masks.float().mean(dim=(1, 2))
    assert (share > 0.002).all() and (share < 0.12).all(), share  # a few percent of the image
    assert (painted.images - clean).abs().amax() > 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_dtypes_and_range_are_kept(dtype: torch.dtype, channels: int) -> None:
    clean = images(4, size=64, channels=channels, dtype=dtype)
    clean[0] = 1.0  # saturated images must stay in range too
    clean[1] = 0.0
    painted = paint(clean, list(KINDS), seed=3)
    assert painted.images.shape == clean.shape and painted.images.dtype == dtype
    assert painted.masks.shape == (4, 64, 64) and painted.masks.dtype == torch.bool
    assert painted.images.min() >= 0.0 and painted.images.max() <= 1.0


def test_same_seed_same_defects_whatever_the_batching() -> None:
    clean = images(8)
    kinds = [KINDS[i % len(KINDS)] for i in range(8)]
    donors = clean.roll(-1, dims=0)
    whole = paint(clean, kinds, seed=7, donors=donors)
    again = paint(clean.clone(), kinds, seed=7, donors=donors)
    halves = [paint(clean[s], kinds[s], seed=7, indices=range(s.start, s.stop), donors=donors[s])
              for s in (slice(0, 3), slice(3, 8))]
    assert torch.equal(whole.images, again.images) and torch.equal(whole.masks, again.masks)
    assert torch.equal(whole.images, torch.cat([h.images for h in halves]))


def test_different_seeds_paint_different_defects() -> None:
    clean = images(4)
    for kind in KINDS:
        first, second = (paint(clean, [kind] * 4, seed=seed) for seed in (0, 1))
        assert not torch.equal(first.masks, second.masks), kind


def test_cutpaste_copies_from_its_donor() -> None:
    clean, donor = torch.zeros(1, 1, 64, 64), torch.ones(1, 1, 64, 64)
    painted = paint(clean, ["cutpaste"], seed=0, donors=donor)
    assert torch.equal(painted.images[0, 0], painted.masks[0].float())  # the patch is the donor's, and only it


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown defect kind"):
        paint(images(1), ["crack"], seed=0)
    with pytest.raises(ValueError, match="expected float images"):
        paint((images(1) * 255).to(torch.uint8), ["blob"], seed=0)
    with pytest.raises(ValueError, match="2 defect kinds for 1 images"):
        paint(images(1), ["blob", "blur"], seed=0)


@pytest.mark.parametrize("n_images", [1, 2, 7, 40, 1000])
def test_defect_plan_is_about_one_pass_with_every_kind(n_images: int) -> None:
    plan = defect_plan(n_images)
    assert len(plan) == min(max(n_images, MIN_DEFECTED), MAX_DEFECTED)
    counts = {kind: sum(k == kind for _, _, k in plan) for kind in KINDS}
    assert min(counts.values()) >= min(len(plan) // len(KINDS) - 2, 4), counts
    assert {image for image, _, _ in plan} == set(range(min(n_images, len(plan))))
    if n_images > 1:
        assert all(donor != image for image, donor, _ in plan)  # pasted from another image of the set
    if 1 < n_images < MIN_DEFECTED:  # images used more than once get another kind each time
        first = [k for image, _, k in plan if image == 0]
        assert len(set(first)) == min(len(first), len(KINDS))


def test_auroc_treats_infinite_as_found_and_nan_as_missed() -> None:
    clean = np.array([1.0, 2.0, 3.0])
    assert _auroc(clean, np.array([4.0, np.inf])) == 1.0
    assert _auroc(clean, np.array([np.nan, np.nan])) == 0.0
    assert _auroc(clean, np.array([2.0])) == pytest.approx(0.5)
    assert _auroc(clean, np.array([])) is None
