"""The threshold from held-out normal images, and the checks that keep a broken one out.

The threshold is set on the calibration images' scores for the target false-alarm rate (`fpr`),
the heat-map color range on their maps. A model whose calibration scores or threshold are not
finite and sane is refused; one calibrated on few or on its own training images gets warnings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from adqueue.core.errors import AdqueueError
from adqueue.core.progress import Progress
from adqueue.detectors.base import Detector
from adqueue.pipeline.images import TensorImages

# Below this many held-out images a quantile threshold moves by whole images: with 7, one image
# is 14% of the calibration set, so the realized false-alarm rate is a rough guess.
MIN_CALIB_IMAGES = 20


@dataclass
class Calibration:
    threshold: float
    map_range: tuple[float, float]
    n_images: int
    in_sample: bool
    scores: list[float] = field(default_factory=list)
    raw_scores: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)  # unrounded, for the self-check


@torch.no_grad()
def calibrate(detector: Detector, pixels: Tensor, fpr: float, progress: Progress, *, in_sample: bool) -> Calibration:
    images = TensorImages(pixels)
    progress.phase("calibrating threshold", len(images))
    scores: list[np.ndarray] = []
    map_values: list[np.ndarray] = []
    batch = 16
    for start in range(0, len(images), batch):
        chunk = torch.stack([images[i] for i in range(start, min(start + batch, len(images)))])
        result = detector.score(chunk.to(detector.device), with_maps=True)
        scores.append(result.image.numpy().astype(np.float64))
        if result.maps is not None:
            map_values.append(result.maps.numpy()[:, ::4, ::4].reshape(-1))
        progress.advance(len(chunk))
    all_scores = np.concatenate(scores)
    check_scores_finite(all_scores)
    if map_values:
        values = np.concatenate(map_values)
        map_range = (float(np.percentile(values, 50)), float(values.max()))
    else:
        map_range = (0.0, 1.0)
    threshold = detector.calibrate_threshold(all_scores, fpr)
    check_threshold(threshold, all_scores, extrapolates=detector.extrapolating_threshold)
    return Calibration(threshold, map_range, len(all_scores), in_sample, [round(float(v), 6) for v in all_scores],
                       all_scores)


def check_scores_finite(scores: np.ndarray) -> None:
    """A NaN or infinite normal score means a broken fit (overflow, diverged training): refuse it."""
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise AdqueueError(f"the model's scores on the {len(scores)} calibration images are not finite "
                           f"({bad} of {len(scores)}): nothing was registered")


def check_threshold(threshold: float, scores: np.ndarray, *, extrapolates: bool) -> None:
    """The threshold must be finite and near the calibration scores.

    A quantile lies within [min, max] of the scores by construction, so anything else is a bug. A
    rule that extrapolates may go past them, but not by more than their whole range again:
    further out it is read off a fitted tail and no normal image would ever reach it.
    """
    low, high = float(scores.min()), float(scores.max())
    spread = high - low if extrapolates else 0.0
    if np.isfinite(threshold) and low - spread <= threshold <= high + spread:
        return
    hint = "; raise fpr or calibrate on more images" if extrapolates else ""
    raise AdqueueError(f"the threshold {threshold:.6g} is outside [{low - spread:.6g}, {high + spread:.6g}], the "
                       f"range that the {len(scores)} calibration scores support: nothing was registered{hint}")


def calibration_warnings(calibration: Calibration, calib_fraction: float) -> list[str]:
    """Why the threshold's false-alarm rate may be far from the target fpr; empty when it should hold."""
    if calibration.in_sample:  # a model fits its own training images best: their scores run low
        why = "calib_fraction=0" if calib_fraction == 0 else "no held-out calibration images"
        return [f"{why}: the threshold is calibrated on the training images themselves, which score lower "
                "than new images: expect more false alarms than the target fpr"]
    if calibration.n_images < MIN_CALIB_IMAGES:
        return [f"the threshold is calibrated on only {calibration.n_images} held-out images: its false-alarm "
                "rate is a rough guess; add defect-free images or raise calib_fraction"]
    return []
