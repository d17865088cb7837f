"""The encoder_flow detector on a tiny synthetic texture with painted square defects (no mocks)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.stats import norm

from adqueue.detectors import registry
from adqueue.detectors.components.thresholds import calibrate_threshold
from adqueue.detectors.encoder_flow.model import EncoderFlowDetector
from adqueue.pipeline.images import TensorImages
from adqueue.pipeline.metrics import image_auroc, pixel_auroc

SIZE = 32
# Tiny on purpose: the whole file runs in seconds on one core; defaults are measured on MTD.
TINY = {"image_size": SIZE, "latent_dim": 8, "width": 8, "max_width": 32, "ae_epochs": 12, "ae_batch_size": 16,
        "ae_lr": 3e-3, "flow_blocks": 4, "flow_hidden": 32, "flow_layers": 1, "flow_epochs": 30,
        "flow_batch_size": 32, "flow_lr": 2e-3, "map_sigma": 1.0}


def _stripes(count: int, rng: np.random.Generator) -> np.ndarray:
    """Normal images: vertical stripes of random phase and contrast, with a little noise, [N, 1, S, S]."""
    x = np.arange(SIZE)[None, None, :]
    phase = rng.uniform(0, 2 * np.pi, (count, 1, 1))
    contrast = rng.uniform(0.15, 0.25, (count, 1, 1))
    rows = 0.5 + contrast * np.sin(2 * np.pi * x / 8 + phase)
    images = np.repeat(rows, SIZE, axis=1) + rng.normal(0, 0.02, (count, SIZE, SIZE))
    return np.clip(images, 0, 1)[:, None].astype(np.float32)


def _with_squares(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark 8 x 8 square pasted at a random place in each image; returns (images, masks)."""
    images, masks = images.copy(), np.zeros((len(images), SIZE, SIZE), dtype=bool)
    for index in range(len(images)):
        top, left = rng.integers(4, SIZE - 12, 2)
        images[index, 0, top : top + 8, left : left + 8] = 0.0
        masks[index, top : top + 8, left : left + 8] = True
    return images, masks


class RecordingProgress:
    """A Progress that keeps what it was told: phase name -> [total, steps advanced, losses seen]."""

    def __init__(self) -> None:
        self.phases: dict[str, list] = {}
        self._current: list | None = None

    def phase(self, name: str, total: int) -> None:
        self._current = self.phases[name] = [total, 0, []]

    def advance(self, n: int = 1, **info: float) -> None:
        assert self._current is not None
        self._current[1] += n
        if "loss" in info:
            self._current[2].append(info["loss"])


def _as_dataset(images: np.ndarray) -> TensorImages:
    return TensorImages(torch.from_numpy(np.round(images * 255).astype(np.uint8)))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and two threads stall on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    defective, masks = _with_squares(_stripes(12, rng), rng)
    return {"train": _stripes(64, rng), "normal": _stripes(12, rng), "defective": defective, "masks": masks}


@pytest.fixture(scope="module")
def fitted(data: dict[str, np.ndarray]) -> tuple[EncoderFlowDetector, dict, RecordingProgress]:
    detector = registry.create("encoder_flow", TINY)
    progress = RecordingProgress()
    report = detector.fit(_as_dataset(data["train"]), progress=progress)
    return detector, report.info, progress


def _batch(images: np.ndarray) -> torch.Tensor:
    return _as_dataset(images).pixels.float() / 255.0


def test_both_stages_lower_their_loss_and_report_progress(fitted) -> None:
    _, info, progress = fitted
    ae, flow = info["autoencoder_l1"], info["flow_nll"]
    assert len(ae) == TINY["ae_epochs"] and len(flow) == TINY["flow_epochs"]
    assert ae[-1] < 0.7 * ae[0]
    assert flow[-1] < flow[0] - 0.5
    assert info["latent_vectors"] == 64 * 4  # every training image under the 4 flips
    ae_total, ae_steps, ae_losses = progress.phases["training autoencoder"]
    assert ae_total == ae_steps == TINY["ae_epochs"] * 4 and len(ae_losses) == ae_steps  # 64 images / 16
    flow_total, flow_steps, flow_losses = progress.phases["training flow"]
    assert flow_total == flow_steps == TINY["flow_epochs"] * 8 and len(flow_losses) == flow_steps


def test_separates_and_localizes_square_defects(fitted, data) -> None:
    detector, *_ = fitted
    scores = detector.score(torch.cat([_batch(data["normal"]), _batch(data["defective"])]))
    labels = [0] * 12 + [1] * 12
    assert scores.image.shape == (24,) and scores.maps.shape == (24, SIZE, SIZE)
    assert image_auroc(labels, scores.image.numpy()) > 0.9
    assert set(scores.extra) == {"reconstruction_l1"}
    maps, masks = scores.maps[12:].numpy(), data["masks"]
    inside = np.array([m[mask].mean() for m, mask in zip(maps, masks, strict=True)])
    outside = np.array([m[~mask].mean() for m, mask in zip(maps, masks, strict=True)])
    assert (inside > outside).mean() >= 0.8
    assert pixel_auroc(maps, masks) > 0.65  # 0.5 for a map blind to the defect


def test_reconstruction_map_option_highlights_the_defect(fitted, data) -> None:
    detector, *_ = fitted
    fresh = registry.create("encoder_flow", {**TINY, "map": "reconstruction"})
    fresh.load_state_dict(detector.state_dict())
    scores = fresh.score(_batch(data["defective"]))
    masks = data["masks"]
    inside = np.array([m[mask].mean() for m, mask in zip(scores.maps.numpy(), masks, strict=True)])
    outside = np.array([m[~mask].mean() for m, mask in zip(scores.maps.numpy(), masks, strict=True)])
    assert (inside > outside).all()
    assert torch.equal(scores.image, detector.score(_batch(data["defective"]), with_maps=False).image)


def test_state_round_trip_scores_identically(fitted, data) -> None:
    detector, *_ = fitted
    fresh = registry.create("encoder_flow", detector.config_dict())
    missing, unexpected = fresh.load_state_dict(detector.trainable_state(), strict=False)
    assert not missing and not unexpected
    batch = _batch(data["defective"][:6])
    a, b = detector.score(batch), fresh.score(batch)
    assert torch.equal(a.image, b.image) and torch.equal(a.maps, b.maps)
    assert torch.equal(a.extra["reconstruction_l1"], b.extra["reconstruction_l1"])
    fresh.train()  # BatchNorm scores with its running statistics whatever the module's mode
    assert torch.equal(fresh.score(batch).image, a.image) and fresh.training


def test_same_seed_same_scores_other_seed_other_scores(fitted, data) -> None:
    _detector, *_ = fitted
    small = {**TINY, "ae_epochs": 2, "flow_epochs": 2}
    batch = _batch(data["defective"][:4])
    runs = []
    for seed in (0, 0, 1):
        numpy_before = np.random.get_state()[1].copy()
        other = registry.create("encoder_flow", {**small, "seed": seed})
        assert np.array_equal(np.random.get_state()[1], numpy_before)  # numpy's global RNG untouched
        torch.manual_seed(1234 + len(runs))  # the global generator must not matter
        other.fit(_as_dataset(data["train"][:32]))
        runs.append(other.score(batch).image)
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_threshold_is_the_gaussian_confidence_bound(fitted) -> None:
    detector, *_ = fitted
    normal = np.random.default_rng(3).normal(10.0, 2.0, 500)
    for fpr in (0.01, 0.05, 0.2):
        expected = normal.mean() + norm.ppf(1 - fpr) * normal.std(ddof=1)
        assert detector.calibrate_threshold(normal, fpr) == pytest.approx(expected, rel=1e-12)
    # z_0.99 = 2.326: about 1% of a large Gaussian sample lies above the bound
    assert 0.005 < (normal > detector.calibrate_threshold(normal, 0.01)).mean() < 0.02
    assert detector.calibrate_threshold(normal, 0.0) == normal.max()
    quantile = registry.create("encoder_flow", {**TINY, "threshold_rule": "quantile"})
    assert quantile.calibrate_threshold(normal, 0.05) == calibrate_threshold(normal, 0.05)
    with pytest.raises(ValueError, match="false-alarm rate"):
        detector.calibrate_threshold(normal, 1.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"image_size": "48"}, "power of two"),
        ({"image_size": "8"}, "power of two"),
        ({"channels": "2"}, "channels must be 1"),
        ({"latent_dim": "1"}, "latent_dim must be at least 2"),
        ({"ae_epochs": "0"}, "ae_epochs must be at least 1"),
        ({"map": "saliency"}, "map must be one of gradient, reconstruction"),
        ({"augment": "rotate"}, "augment must be one of none, flips, dihedral"),
        ({"threshold_rule": "max"}, "threshold_rule must be one of"),
        ({"ae_lr": "-1"}, "must be positive"),
        ({"width": "many"}, "not a valid int"),
        ({"nonsense": "1"}, "unknown setting"),
    ],
)
def test_settings_are_validated(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        registry.create("encoder_flow", settings)


def test_unfitted_detector_says_so() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        registry.create("encoder_flow", TINY).score(torch.zeros(1, 1, SIZE, SIZE))
