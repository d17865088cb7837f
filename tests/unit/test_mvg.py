"""The mvg detector on real textures with painted defects (no mocks, small images for speed)."""

from pathlib import Path

import pytest
import torch

from adqueue.data.loader import to_float
from adqueue.detectors import registry
from adqueue.detectors.mvg.model import MVGDetector
from adqueue.pipeline.images import TensorImages
from adqueue.pipeline.metrics import image_auroc, pixel_auroc
from tests.helpers.datasets import load_split, split_masks

FAST = {"backbone": "efficientnet_lite0", "image_size": "128", "levels": "3,4,5,6", "map_levels": "2,3,4"}



@pytest.fixture(scope="module")
def fitted(textures) -> tuple[MVGDetector, Path]:
    root, _ = textures
    detector = registry.create("mvg", FAST)
    pixels, _ = load_split(root, "train", 128)
    report = detector.fit(TensorImages(pixels))
    assert report.n_images == len(pixels)
    return detector, root


def test_mvg_separates_and_localizes_painted_defects(fitted) -> None:
    detector, root = fitted
    pixels, items = load_split(root, "test", 128)
    scores = detector.score(to_float(pixels))
    labels = [item.label for item in items]
    assert scores.image.shape == (len(items),) and scores.maps.shape == (len(items), 128, 128)
    assert image_auroc(labels, scores.image.numpy()) > 0.9
    masks = split_masks(items, 128)
    assert pixel_auroc(scores.maps.numpy(), masks) > 0.85


def test_state_round_trip_scores_identically(fitted) -> None:
    detector, root = fitted
    state = detector.trainable_state()
    assert not any(key.startswith("backbone.") for key in state)  # frozen weights are not copied
    fresh = registry.create("mvg", detector.config_dict())
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(key.startswith("backbone.") for key in missing)
    pixels, _ = load_split(root, "test", 128)
    a, b = detector.score(to_float(pixels[:6])), fresh.score(to_float(pixels[:6]))
    assert torch.equal(a.image, b.image) and torch.equal(a.maps, b.maps)


def test_opca_keeps_fewer_components_than_all(fitted) -> None:
    detector, _ = fitted
    kept = [g.kept for g in detector.image_gaussians]
    dims = detector.backbone.channels(detector.config.levels)
    assert all(0 < k < d for k, d in zip(kept, dims, strict=True))


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown setting"):
        registry.create("mvg", {"nonsense": "1"})
    with pytest.raises(ValueError, match="not a valid int"):
        registry.create("mvg", {"image_size": "big"})
    with pytest.raises(ValueError, match="levels 0-8"):
        registry.create("mvg", {**FAST, "levels": "3,12"})
    config = registry.create("mvg", {**FAST, "variance": "all"}).config
    assert config.variance is None and config.levels == (3, 4, 5, 6)


def test_unfitted_detector_says_so() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        registry.create("mvg", FAST).score(torch.zeros(1, 3, 128, 128))
