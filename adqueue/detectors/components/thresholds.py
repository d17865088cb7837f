"""The anomaly threshold from held-out normal images' scores, for a target false-alarm rate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import norm


def calibrate_threshold(normal_scores: Sequence[float] | np.ndarray, fpr: float) -> float:
    """Smallest threshold flagging at most `fpr` of the given normal scores (score > threshold)."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"target false-alarm rate must be in [0, 1), not {fpr}")
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no normal scores to calibrate a threshold on")
    allowed = int(np.floor(fpr * scores.size))  # how many normal images may lie above
    return float(scores[scores.size - 1 - allowed])


def gaussian_bound(normal_scores: Sequence[float] | np.ndarray, fpr: float) -> float:
    """One-sided Gaussian confidence bound mean + z_(1-fpr) * std of normal scores (std with ddof=1)."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"target false-alarm rate must be in (0, 1) for a Gaussian bound, not {fpr}")
    scores = np.asarray(normal_scores, dtype=np.float64)
    if scores.size < 2:
        raise ValueError("need at least two normal scores for a Gaussian confidence bound")
    return float(scores.mean() + norm.ppf(1.0 - fpr) * scores.std(ddof=1))
