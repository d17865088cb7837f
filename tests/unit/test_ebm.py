"""The ebm detector on a tiny synthetic texture with painted defects (no mocks, 32 px for speed)."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch

from adqueue.detectors import registry
from adqueue.detectors.ebm.model import EBMDetector
from adqueue.pipeline.images import TensorImages
from adqueue.pipeline.metrics import image_auroc, pixel_auroc

SIZE = 32
# A small net, short chains and few updates: the shape of the default training, at test speed.
TINY = {"image_size": str(SIZE), "width": "8", "iterations": "40", "batch_size": "16", "negatives": "8",
        "sgld_steps": "10", "lr": "1e-3", "map_sigma": "0"}


def _textures(n: int, seed: int) -> torch.Tensor:
    """Grey vertical stripes, nearly aligned, with random brightness and grain: uint8 [n, 1, S, S]."""
    rng = np.random.default_rng(seed)
    x = np.arange(SIZE)[None, None, :]
    phase = rng.uniform(-0.3, 0.3, (n, 1, 1))
    level = rng.uniform(0.4, 0.6, (n, 1, 1))
    images = level + 0.12 * np.sin(2 * np.pi * x / 8 + phase) + rng.normal(0, 0.02, (n, SIZE, SIZE))
    return torch.from_numpy(np.clip(images * 255, 0, 255).astype(np.uint8))[:, None]


def _with_defects(images: torch.Tensor, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """A dark or bright 6x6 blob in each image, and its mask."""
    rng = np.random.default_rng(seed)
    out, masks = images.clone(), np.zeros((len(images), SIZE, SIZE), bool)
    for i in range(len(images)):
        y, x = rng.integers(4, SIZE - 10, 2)
        out[i, :, y:y + 6, x:x + 6] = int(rng.choice([10, 245]))
        masks[i, y:y + 6, x:x + 6] = True
    return out, masks


def _float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 255.0


class RecordingProgress:
    """Keeps what fit() reports, as the CLI's progress bar would show it."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, int]] = []
        self.steps: list[dict[str, float]] = []

    def phase(self, name: str, total: int) -> None:
        self.phases.append((name, total))

    def advance(self, n: int = 1, **info: float) -> None:
        if info:
            self.steps.append(info)


@pytest.fixture(scope="module")
def trained() -> tuple[EBMDetector, RecordingProgress, torch.Tensor]:
    detector = registry.create("ebm", TINY)
    assert isinstance(detector, EBMDetector)
    noise = torch.rand(16, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = torch.stack([detector.energy(_float(_textures(16, seed=1))), detector.energy(noise)])
    progress = RecordingProgress()
    report = detector.fit(TensorImages(_textures(48, seed=0)), progress=progress)
    assert report.n_images == 48 and len(report.losses) == 40
    return detector, progress, before


def test_training_reports_progress_and_separates_data_from_noise(trained) -> None:
    detector, progress, before = trained
    assert progress.phases[0] == ("training energy net", 40) and len(progress.steps) == 40
    assert set(progress.steps[0]) == {"loss", "e_pos", "e_neg"}
    data_before, noise_before = before
    assert data_before.max() > noise_before.min()  # the untrained net cannot tell them apart
    with torch.no_grad():
        data = detector.energy(_float(_textures(16, seed=1)))
        noise = detector.energy(torch.rand(16, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    assert data.max() + 0.2 < noise.min()


def test_separates_and_localizes_painted_defects(trained) -> None:
    detector, _, _ = trained
    normal = _textures(16, seed=2)
    defective, masks = _with_defects(_textures(16, seed=3), seed=4)
    scores = detector.score(_float(torch.cat([normal, defective])))
    labels = [0] * 16 + [1] * 16
    assert scores.maps is not None and scores.maps.shape == (32, SIZE, SIZE)
    assert set(scores.extra) == {"energy", "a_raw_l1", "a_raw_l2", "a_std_l1", "a_std_l2"}
    assert torch.equal(scores.image, scores.extra["a_std_l2"])
    without_maps = detector.score(_float(torch.cat([normal, defective])), with_maps=False)
    assert without_maps.maps is None and torch.equal(without_maps.image, scores.image)
    assert image_auroc(labels, scores.image.numpy()) > 0.9
    all_masks = np.concatenate([np.zeros((16, SIZE, SIZE), bool), masks])
    assert pixel_auroc(scores.maps.numpy(), all_masks) > 0.95


def test_sgld_moves_samples_to_lower_energy_without_parameter_gradients(trained) -> None:
    detector, _, _ = trained
    assert all(p.grad is None for p in detector.parameters())  # fit() leaves none behind
    generator = torch.Generator().manual_seed(1)
    start = torch.rand(8, 1, SIZE, SIZE, generator=generator)
    samples = detector.sample(start, 10, generator)
    with torch.no_grad():
        before, after = detector.energy(start), detector.energy(samples)
    assert (after < before).all()
    assert samples.min() >= 0 and samples.max() <= 1
    assert all(p.grad is None for p in detector.parameters())


def test_gradient_standardization_matches_numpy(trained) -> None:
    detector, _, _ = trained
    images = _float(_textures(12, seed=5))
    grads = []
    for image in images:  # one image at a time, by plain autograd
        x = image[None].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(detector.energy(x).sum(), x)
        grads.append(grad[0].double().numpy())
    g = np.stack(grads)
    detector.fit_gradient_statistics(images)
    # float32 gradients, float64 sums: a tolerance on the scale of the gradients themselves
    atol = 1e-5 * np.abs(g).max()
    np.testing.assert_allclose(detector.grad_mean.numpy(), g.mean(axis=0), rtol=1e-4, atol=atol)
    np.testing.assert_allclose(detector.grad_std.numpy(), g.std(axis=0, ddof=1), rtol=1e-4, atol=atol)
    test = _float(_textures(3, seed=6))
    scores = detector.score(test)
    z = (_grads(detector, test) - g.mean(axis=0)) / g.std(axis=0, ddof=1)
    np.testing.assert_allclose(scores.extra["a_std_l1"].numpy(), np.abs(z).sum(axis=(1, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(scores.extra["a_std_l2"].numpy(), np.sqrt((z**2).sum(axis=(1, 2, 3))), rtol=1e-4)
    np.testing.assert_allclose(scores.maps.numpy(), np.sqrt((z**2).sum(axis=1)), rtol=1e-4, atol=1e-5)
    raw = _grads(detector, test)
    np.testing.assert_allclose(scores.extra["a_raw_l1"].numpy(), np.abs(raw).sum(axis=(1, 2, 3)), rtol=1e-4)
    # Leave the fixture as it was for the other tests.
    detector.fit_gradient_statistics(_float(_textures(48, seed=0)))


def _grads(detector: EBMDetector, images: torch.Tensor) -> np.ndarray:
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(detector.energy(x).sum(), x)
    return grad.double().numpy()


def test_state_round_trip_scores_identically(trained) -> None:
    detector, _, _ = trained
    fresh = registry.create("ebm", detector.config_dict())
    saved = safetensors.torch.load(safetensors.torch.save(detector.trainable_state()))  # as the service saves
    fresh.load_state_dict(saved)  # strict: every key, every shape
    batch = _float(_with_defects(_textures(6, seed=7), seed=8)[0])
    a, b = detector.score(batch), fresh.score(batch)
    assert torch.equal(a.image, b.image) and torch.equal(a.maps, b.maps)
    assert all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra)


def test_same_seed_same_scores_other_seed_other_scores() -> None:
    quick = {**TINY, "iterations": "3", "sgld_steps": "4"}
    data, batch = TensorImages(_textures(16, seed=0)), _float(_textures(4, seed=9))
    runs = []
    for seed in (3, 3, 4):
        detector = registry.create("ebm", {**quick, "seed": str(seed)})
        detector.fit(data)
        runs.append(detector.score(batch).image)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_replay_buffer_option_trains() -> None:
    detector = registry.create("ebm", {**TINY, "iterations": "4", "sgld_steps": "4", "replay_buffer": "32"})
    report = detector.fit(TensorImages(_textures(16, seed=0)))
    assert len(report.losses) == 4 and np.isfinite(report.losses).all()


@pytest.mark.parametrize(("settings", "message"), [
    ({"image_size": "100"}, "multiple of 32"),
    ({"channels": "2"}, "channels must be 1"),
    ({"norm": "3"}, "norm must be 1 or 2"),
    ({"sgld_steps": "0"}, "sgld_steps must be at least 1"),
    ({"lr": "fast"}, "not a valid float"),
    ({"steps": "10"}, "unknown setting"),
])
def test_settings_are_validated(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        registry.create("ebm", settings)


def test_unfitted_or_misshapen_input_is_refused() -> None:
    detector = registry.create("ebm", {"image_size": str(SIZE), "width": "4"})
    assert detector.preprocess.size == SIZE and detector.preprocess.channels == 1
    with pytest.raises(RuntimeError, match="not fitted"):
        detector.score(torch.zeros(1, 1, SIZE, SIZE))
    assert detector.load_fitted(detector.trainable_state()) == ([], []) and detector.fitted  # any complete state
    with pytest.raises(ValueError, match=r"expects \[B, 1, 32, 32\]"):
        detector.score(torch.zeros(1, 3, SIZE, SIZE))
