"""Has the normal part of a night's scores moved away from what the threshold was set on?

The threshold was calibrated on held-out defect-free images (models.params["calibration"]
["scores"]). A night's scores at or below the threshold are its normal part; when lighting, a
camera or the product changes, that part shifts, and the false-alarm rate the threshold promised
no longer holds, long before anyone notices the anomaly rate moving.

The test is the two-sample Kolmogorov-Smirnov statistic D = sup |F_night(x) - F_calibration(x)|
(0: the same distribution, 1: no overlap at all), with both sides cut at the threshold so that an
unchanged night compares like with like. We warn when D > KS_CUTOFF with at least
KS_MIN_SAMPLES scores on each side. Why 0.3: for a bell-shaped score, a shift of the normal scores
by d times their spread gives D = 2 Phi(d / 2) - 1, so D = 0.3 is a shift of about 0.8 of the
spread, enough to move the false-alarm rate the threshold was set for several-fold. Why 50: two
samples of 50 from one distribution exceed D = 0.3 by chance about 2% of the time (asymptotic
Kolmogorov distribution; far less with more scores on either side), while with 20 and 20 it happens
every few nights. The statistic is always shown, so a reader can apply a stricter bar.

Pure Python (no scipy: the server and the read verbs must start fast and light). Used by the trend
page and by the alarms a job carries when it ends (adqueue/jobs/alarms.py).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

KS_CUTOFF = 0.3
KS_MIN_SAMPLES = 50


def ks_statistic(first: Sequence[float], second: Sequence[float]) -> float:
    """The two-sample KS statistic of two samples (exact; ties handled as scipy's ks_2samp does)."""
    a, b = sorted(first), sorted(second)
    if not a or not b:
        raise ValueError("the KS statistic needs two non-empty samples")
    # Both empirical CDFs only jump at sample values, so the supremum is attained at one of them.
    return max(abs(bisect_right(a, x) / len(a) - bisect_right(b, x) / len(b)) for x in (*a, *b))


@dataclass(frozen=True)
class Drift:
    statistic: float | None  # None: one side is empty
    n_night: int  # normal scores of the night
    n_calibration: int

    @property
    def enough_samples(self) -> bool:
        return self.n_night >= KS_MIN_SAMPLES and self.n_calibration >= KS_MIN_SAMPLES

    @property
    def warn(self) -> bool:
        return self.statistic is not None and self.enough_samples and self.statistic > KS_CUTOFF

    @property
    def note(self) -> str:
        if self.statistic is None:
            return "no calibration scores" if not self.n_calibration else "no normal scores"
        if not self.enough_samples:
            return f"too few scores to judge (fewer than {KS_MIN_SAMPLES})"
        return f"drift: KS {self.statistic:.2f} > {KS_CUTOFF}" if self.warn else "ok"


def drift(night_normal: Sequence[float], calibration: Sequence[float], n_night: int | None = None) -> Drift:
    """KS drift of a night's normal scores from the calibration scores. `n_night`: how many normal
    scores the night had, when `night_normal` is a sample of them."""
    count = len(night_normal) if n_night is None else n_night
    if not night_normal or not calibration:
        return Drift(None, count, len(calibration))
    return Drift(ks_statistic(night_normal, calibration), count, len(calibration))
