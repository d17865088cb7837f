"""What every registered detector owes the code around it, checked the same way for each: the
not-fitted guard, torch-free settings, preprocessing from the config, and a trained state that
loads into a fresh detector and scores exactly alike (tiny settings: seconds per detector)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import get_type_hints

import numpy as np
import pytest
import torch

from adqueue.detectors import registry
from adqueue.detectors.base import Detector
from adqueue.jobs.train_settings import TRAIN_KEYS

REPO = Path(__file__).resolve().parents[2]
LITE = {"backbone": "efficientnet_lite0", "image_size": "64"}
TINY: dict[str, dict[str, str]] = {
    "mvg": LITE,
    "patchcore": {**LITE, "levels": "3,5", "level_dim": "16", "coreset_fraction": "0.2"},
    "differnet": {**LITE, "n_scales": "2", "hidden": "16", "n_blocks": "2", "epochs": "2", "train_transforms": "2",
                  "test_transforms": "3", "map_transforms": "2"},
    "ebm": {"image_size": "32", "width": "4", "iterations": "3", "batch_size": "8", "negatives": "4",
            "sgld_steps": "3"},
    "encoder_flow": {"image_size": "32", "channels": "3", "latent_dim": "4", "width": "4", "max_width": "8",
                     "ae_epochs": "2", "ae_batch_size": "8", "flow_blocks": "2", "flow_hidden": "8",
                     "flow_layers": "1", "flow_epochs": "2", "flow_batch_size": "8"},
}
# The state entries older code reads as "fitted": model files must keep carrying them.
LEGACY_FITTED_ENTRIES = {"differnet": "fitted", "encoder_flow": "fitted", "ebm": "n_fitted"}


def test_every_registered_detector_has_tiny_settings_here() -> None:
    assert sorted(TINY) == registry.names()


def _images(detector: Detector, count: int, seed: int) -> torch.Tensor:
    """Noisy stripes of random phase at the detector's input size: float [count, C, S, S] in [0, 1]."""
    size, channels = detector.preprocess.size, detector.preprocess.channels
    rng = np.random.default_rng(seed)
    x = np.arange(size)[None, None, None, :]
    phase = rng.uniform(0, 2 * np.pi, (count, channels, 1, 1))
    images = 0.5 + 0.2 * np.sin(2 * np.pi * x / 8 + phase) + rng.normal(0, 0.05, (count, channels, size, size))
    return torch.from_numpy(np.clip(images, 0, 1).astype(np.float32))


class _Fitted(dict[str, Detector]):
    """One tiny fitted detector per name, fitted on first use."""

    def __missing__(self, name: str) -> Detector:
        detector = registry.create(name, TINY[name])
        report = detector.fit(list(_images(detector, 16, seed=0)))
        assert report.n_images == 16 and report.seconds > 0
        self[name] = detector
        return detector


@pytest.fixture(scope="module")
def fitted() -> _Fitted:
    return _Fitted()


def _same_scores(a: Detector, b: Detector, batch: torch.Tensor) -> None:
    for with_maps in (True, False):
        x, y = a.score(batch, with_maps=with_maps), b.score(batch, with_maps=with_maps)
        assert torch.equal(x.image, y.image)
        assert (x.maps is None) == (y.maps is None) == (not with_maps)
        assert x.maps is None or torch.equal(x.maps, y.maps)
        assert x.extra.keys() == y.extra.keys() and all(torch.equal(x.extra[k], y.extra[k]) for k in x.extra)


@pytest.mark.parametrize("name", sorted(TINY))
def test_an_unfitted_detector_refuses_to_score(name: str) -> None:
    detector = registry.create(name, TINY[name])
    assert not detector.fitted
    with pytest.raises(RuntimeError, match=rf"^the {name} detector is not fitted: call fit\(\) or load a trained"):
        detector.score(_images(detector, 1, seed=1))
    with pytest.raises(RuntimeError, match=rf"^the {name} detector is not fitted"):
        detector.score_flagged(_images(detector, 1, seed=1), 0.0)


@pytest.mark.parametrize("name", sorted(TINY))
def test_settings_load_and_check_without_torch(name: str) -> None:
    code = (f"import sys; from adqueue.detectors import registry; spec = registry.config_spec({name!r}); "
            "spec.build({}); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_class_matches_its_settings_module(name: str) -> None:
    spec, cls = registry.config_spec(name), registry.detector_class(name)
    assert cls.name == name and cls.Config is spec.config_class
    assert cls.extrapolating_threshold is (name == "encoder_flow")
    config = spec.build(TINY[name])
    detector = cls(config)
    assert detector.preprocess.size == config.image_size
    assert detector.preprocess.channels == (config.channels if name in ("ebm", "encoder_flow") else 3)
    identity = detector.backbone_identity()
    if detector.frozen_prefixes:
        assert set(identity) == {"name", "sha256"} and identity["name"] == config.backbone
    else:
        assert identity == {}


def test_unknown_names_list_the_known_ones() -> None:
    message = "^unknown detector 'vgg'; available: differnet, ebm, encoder_flow, mvg, patchcore$"
    for lookup in (registry.config_spec, registry.detector_class):
        with pytest.raises(ValueError, match=message):
            lookup("vgg")


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_trained_state_loads_into_a_fresh_detector_and_scores_alike(name: str, fitted: _Fitted) -> None:
    detector = fitted[name]
    assert detector.fitted
    state = detector.trainable_state()
    assert not any(key.startswith(detector.frozen_prefixes) for key in state)  # the backbone comes from its package
    if name in LEGACY_FITTED_ENTRIES:
        assert bool(state[LEGACY_FITTED_ENTRIES[name]])
    fresh = registry.create(name, detector.config_dict())
    assert not fresh.fitted
    assert fresh.load_fitted(state) == ([], [])
    assert fresh.fitted
    _same_scores(detector, fresh, _images(detector, 3, seed=2))


@pytest.mark.parametrize("name", sorted(TINY))
def test_maps_for_the_flagged_images_are_their_maps_and_the_rest_are_zero(name: str, fitted: _Fitted) -> None:
    detector = fitted[name]
    batch = _images(detector, 6, seed=3)
    whole = detector.score(batch, with_maps=True)
    assert whole.maps is not None
    threshold = float(whole.image.median())
    flagged = whole.image > threshold
    assert 0 < int(flagged.sum()) < len(batch)
    part = detector.score_flagged(batch, threshold)
    assert part.maps is not None and part.maps.shape == whole.maps.shape
    torch.testing.assert_close(part.image, whole.image, rtol=1e-5, atol=1e-6)
    # The flagged images' maps may come from a smaller batch (a second pass): equal to rounding.
    torch.testing.assert_close(part.maps[flagged], whole.maps[flagged], rtol=1e-4, atol=1e-5)
    if detector.costly_maps or name == "mvg":  # maps computed for the flagged images only
        assert not part.maps[~flagged].any()
        nothing = detector.score_flagged(batch, None)  # a model without a threshold flags nothing
        assert nothing.maps is not None and not nothing.maps.any()


@pytest.mark.parametrize("name", sorted(TINY))
def test_an_incomplete_or_foreign_state_leaves_the_detector_unfitted(name: str, fitted: _Fitted) -> None:
    state = fitted[name].trainable_state()
    dropped = sorted(state)[0]
    fresh = registry.create(name, TINY[name])
    missing, unexpected = fresh.load_fitted({k: v for k, v in state.items() if k != dropped})
    assert (missing, unexpected) == ([dropped], []) and not fresh.fitted
    missing, unexpected = fresh.load_fitted({**state, "stray": torch.zeros(1)})
    assert (missing, unexpected) == ([], ["stray"]) and not fresh.fitted
    fresh.load_state_dict(state, strict=False)  # loaded the plain way, a complete state counts as well
    assert fresh.fitted


@pytest.mark.parametrize("name", ["differnet", "encoder_flow"])
def test_a_state_that_records_it_was_not_fitted_loads_unfitted(name: str) -> None:
    unfitted = registry.create(name, TINY[name])
    state = unfitted.trainable_state()
    assert state["fitted"].dtype == torch.bool and not bool(state["fitted"])
    fresh = registry.create(name, TINY[name])
    assert fresh.load_fitted(state) == ([], []) and not fresh.fitted


def _numeric_settings(name: str) -> dict[str, type]:
    """Every int or float `--set` key of the detector (the seed is a training key)."""
    config_class = registry.config_spec(name).config_class
    hints = get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)
            if f.name not in TRAIN_KEYS and hints[f.name] in (int, float, float | None)}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_numeric_setting_refuses_what_no_training_survives(name: str) -> None:
    """NaN, infinities and negative numbers are refused by the torch-free checks that run before a
    job exists, for every numeric setting, in one line naming the setting (and, for a number, its
    range); none reaches a training that then crashes or registers a useless model."""
    spec = registry.config_spec(name)
    settings = _numeric_settings(name)
    assert len(settings) >= 5
    for setting, kind in settings.items():
        for value in ("nan", "inf", "-inf", "-1"):
            with pytest.raises(ValueError) as refused:
                spec.build({setting: value})
            message = str(refused.value)
            assert "\n" not in message
            if kind is int and value != "-1":
                assert message == f"setting {setting}={value!r} is not a valid int"
            else:
                assert re.match(rf"^(.+, )?{setting}(, .+)? must be .+, not ", message), message


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_blur_wider_than_the_image_is_refused(name: str) -> None:
    spec = registry.config_spec(name)
    size = spec.build({}).image_size
    for setting in [s for s in _numeric_settings(name) if s.endswith("_sigma")]:
        spec.build({setting: str(size)})
        with pytest.raises(ValueError, match=rf"^{setting} must be in \[0, {size}\] \(.*at most image_size\), not "):
            spec.build({setting: "1e12"})
