"""The differnet detector on real textures with painted defects (small settings for speed)."""

from pathlib import Path

import pytest
import torch

from adqueue.data.loader import to_float
from adqueue.detectors import registry
from adqueue.detectors.components.augment import evenly_spread_transforms, rotate
from adqueue.detectors.differnet.model import DifferNetDetector
from adqueue.pipeline.images import TensorImages
from adqueue.pipeline.metrics import image_auroc, pixel_auroc
from tests.helpers.datasets import load_split, split_masks

SIZE = 128
FAST = {"image_size": str(SIZE), "hidden": "256", "n_hidden": "2", "n_blocks": "4", "epochs": "12",
        "train_transforms": "4", "test_transforms": "4", "map_transforms": "2", "lr": "1e-3"}



@pytest.fixture(scope="module")
def fitted(textures) -> tuple[DifferNetDetector, Path]:
    root, _ = textures
    detector = registry.create("differnet", FAST)
    pixels, _ = load_split(root, "train", SIZE)
    report = detector.fit(TensorImages(pixels))
    assert report.info["cached_vectors"] == 4 * len(pixels)
    assert report.losses[-1] < report.losses[0]
    detector.eval()
    return detector, root


def test_separates_and_localizes_painted_defects(fitted) -> None:
    detector, root = fitted
    pixels, items = load_split(root, "test", SIZE)
    scores = detector.score(to_float(pixels), with_maps=True)
    labels = [item.label for item in items]
    assert scores.image.shape == (len(items),) and scores.maps.shape == (len(items), SIZE, SIZE)
    assert image_auroc(labels, scores.image.numpy()) > 0.85
    masks = split_masks(items, SIZE)
    assert pixel_auroc(scores.maps.numpy(), masks) > 0.7


def test_score_is_the_nll_averaged_over_the_fixed_transforms(fitted) -> None:
    detector, root = fitted
    pixels, _ = load_split(root, "test", SIZE)
    images = to_float(pixels[:3])
    transforms = evenly_spread_transforms(4, seed=0, rotation=True, brightness=0.15, contrast=0.15)
    assert transforms.angles.tolist() == [0.0, 90.0, 180.0, 270.0]
    with torch.no_grad():
        by_hand = torch.stack([
            detector.flow.nll(detector.features(transforms[t : t + 1].repeat(3).apply(images)))
            for t in range(4)
        ]).mean(dim=0)
    result = detector.score(images, with_maps=False)
    scored = result.image
    assert torch.allclose(scored, by_hand, rtol=1e-5)
    assert torch.equal(result.extra["nll"], scored)  # the default score, and the authors' z^2 beside it
    with torch.no_grad():
        z2 = torch.stack([
            detector.flow(detector.features(transforms[t : t + 1].repeat(3).apply(images)))[0].pow(2).mean(dim=1)
            for t in range(4)
        ]).mean(dim=0)
    assert torch.allclose(result.extra["z2"], z2, rtol=1e-5)
    # with maps, the scores come from the same forward passes and do not change
    assert torch.allclose(detector.score(images, with_maps=True).image, scored, rtol=1e-5)
    # an image's score does not depend on the batch it is in
    alone = detector.score(images[1:2], with_maps=False).image
    assert torch.allclose(alone, scored[1:2], rtol=1e-5)


def test_maps_are_rotated_back_into_the_image_frame(fitted) -> None:
    _detector, _ = fitted
    blob = torch.zeros(1, 1, SIZE, SIZE)
    blob[..., 10:20, 60:68] = 1.0
    turned = rotate(blob, torch.tensor([90.0]))
    assert turned[..., 10:20, 60:68].sum() < 1  # it moved ...
    assert torch.allclose(rotate(turned, torch.tensor([-90.0])), blob, atol=1e-4)  # ... and comes back


def test_state_round_trip_scores_identically(fitted) -> None:
    detector, root = fitted
    state = detector.trainable_state()
    assert not any(key.startswith("features.") for key in state)  # frozen weights are not copied
    fresh = registry.create("differnet", detector.config_dict())
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(key.startswith("features.backbone.") for key in missing)
    pixels, _ = load_split(root, "test", SIZE)
    a = detector.score(to_float(pixels[:2]), with_maps=True)
    b = fresh.eval().score(to_float(pixels[:2]), with_maps=True)
    assert torch.equal(a.image, b.image) and torch.allclose(a.maps, b.maps)


def test_same_seed_same_model(textures) -> None:
    root, _ = textures
    pixels, _ = load_split(root, "train", SIZE)
    tiny = {**FAST, "hidden": "32", "epochs": "2", "train_transforms": "1", "test_transforms": "1"}
    scores = []
    for _ in range(2):
        detector = registry.create("differnet", tiny)
        detector.fit(TensorImages(pixels[:8]))
        scores.append(detector.eval().score(to_float(pixels[:2]), with_maps=False).image)
    assert torch.equal(scores[0], scores[1])
    other = registry.create("differnet", {**tiny, "seed": "1"})
    other.fit(TensorImages(pixels[:8]))
    assert not torch.equal(scores[0], other.eval().score(to_float(pixels[:2]), with_maps=False).image)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="levels 0-8"):
        registry.create("differnet", {"levels": "7,9"})
    with pytest.raises(ValueError, match="unknown backbone"):
        registry.create("differnet", {"backbone": "vgg"})
    with pytest.raises(ValueError, match="at least 32 pixels"):
        registry.create("differnet", {"image_size": "64"})
    with pytest.raises(ValueError, match="test_transforms"):
        registry.create("differnet", {"test_transforms": "0"})
    with pytest.raises(ValueError, match="score must be one of nll, z2"):
        registry.create("differnet", {"score": "energy"})
    with pytest.raises(RuntimeError, match="not fitted"):
        registry.create("differnet", FAST).score(torch.zeros(1, 3, SIZE, SIZE))
