"""Evaluation metrics: image AUROC, pixel AUROC, PRO, rates at a threshold.

AUROC comes from scikit-learn. PRO (per-region overlap, Bergmann et al., MVTec AD) is ours: the
mean over ground-truth regions of the share of each region flagged, as a function of the
false-positive rate on defect-free pixels, integrated up to a false-positive rate of 0.3 and
divided by 0.3 so that a perfect map scores 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

PRO_FPR_LIMIT = 0.3
PRO_STEPS = 300
# Pixel AUROC sorts every pixel; above this many we draw a fixed-seed uniform sample, which
# estimates the same AUROC without tens of gigabytes of sort buffers.
MAX_AUROC_PIXELS = 20_000_000


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """AUROC of defective (1) vs normal (0); None when only one class is present."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray, *, seed: int = 0) -> float | None:
    """AUROC over all pixels of `maps` [N, H, W] against boolean `masks` [N, H, W]."""
    values = maps.reshape(-1)
    truth = masks.reshape(-1)
    if values.size > MAX_AUROC_PIXELS:
        pick = np.random.default_rng(seed).choice(values.size, MAX_AUROC_PIXELS, replace=False)
        values, truth = values[pick], truth[pick]
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, values))


def pro_score(
    maps: np.ndarray, masks: np.ndarray, *, fpr_limit: float = PRO_FPR_LIMIT, steps: int = PRO_STEPS
) -> float | None:
    """Normalized area under the PRO curve for false-positive rates in [0, fpr_limit]."""
    curve = pro_curve(maps, masks, fpr_limit=fpr_limit, steps=steps)
    if curve is None:
        return None
    fpr, pro = curve
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def pro_curve(
    maps: np.ndarray, masks: np.ndarray, *, fpr_limit: float = PRO_FPR_LIMIT, steps: int = PRO_STEPS
) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, pro) on a grid of `steps` false-positive rates from 0 to `fpr_limit`.

    pro[k] is the mean region overlap at the lowest threshold whose false-positive rate on
    defect-free pixels is at most fpr[k] (a pixel is flagged when its score is above the
    threshold), i.e. the best overlap reachable within that false-alarm budget. Thresholds are
    read off the sorted normal scores, overlaps off each region's sorted scores.
    """
    masks = masks.astype(bool)
    normal = np.sort(maps[~masks].astype(np.float64))
    if normal.size == 0:
        return None
    regions = [np.sort(r) for r in _region_scores(maps, masks)]
    if not regions:
        return None
    fpr = np.linspace(0.0, fpr_limit, steps)
    # At most floor(f * n) normal pixels may lie above the threshold.
    allowed = np.floor(fpr * normal.size + 1e-9).astype(int)
    thresholds = normal[np.clip(normal.size - 1 - allowed, 0, normal.size - 1)]
    overlaps = np.stack([1.0 - np.searchsorted(r, thresholds, side="right") / r.size for r in regions])
    return fpr, overlaps.mean(axis=0)


def _region_scores(maps: np.ndarray, masks: np.ndarray) -> list[np.ndarray]:
    """Scores of each 8-connected ground-truth region, image by image."""
    structure = np.ones((3, 3), dtype=bool)
    out: list[np.ndarray] = []
    for amap, mask in zip(maps, masks, strict=True):
        if not mask.any():
            continue
        labels, count = ndimage.label(mask, structure=structure)
        for region in range(1, count + 1):
            out.append(amap[labels == region].astype(np.float64))
    return out


@dataclass(frozen=True)
class RateAtThreshold:
    false_alarm_rate: float | None
    recall: float | None


def rates_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> RateAtThreshold:
    flagged = np.asarray(scores) > threshold
    labels = np.asarray(labels)
    normal, defective = labels == 0, labels == 1
    return RateAtThreshold(
        false_alarm_rate=float(flagged[normal].mean()) if normal.any() else None,
        recall=float(flagged[defective].mean()) if defective.any() else None,
    )
