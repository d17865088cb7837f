"""What was wrong with a job when it ended: the alarms its notification and its pages carry.

Kinds:
- `failed`, `cancelled`: the job did not complete (its error says why).
- `anomaly_rate` (score jobs): far more images flagged than the threshold was set for. The
  threshold was set on `n_cal` held-out normal images, `j` of which score above it. If tonight's
  images were like those, the number of them above the threshold would follow the predictive
  distribution of exchangeable samples, a beta-binomial(n, j + 1, n_cal - j): it allows for how
  little a small calibration set pins the real false-alarm rate down (with 7 calibration images a
  threshold above all of them may still pass a quarter of normal images). The alarm is raised when
  as many flagged images as tonight's would happen by chance with probability below
  ANOMALY_RATE_P (1 in 1,000): 1 flagged of 50 does not alarm (p = 0.5 with 50 calibration
  images), 128 of 128 does (p ~ 1e-150 with 152).
- `drift` (score jobs): the normal part of the scores moved away from the calibration scores
  (KS statistic above 0.3 with 50 or more scores on each side; adqueue/jobs/drift.py).
- `errors`: more than `error_share` of the files could not be scored (unreadable, not images).

Pure Python: the read verbs and the web server show the stored alarms without importing numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adqueue.jobs.drift import Drift

ANOMALY_RATE_P = 1e-3
DEFAULT_ERROR_SHARE = 0.05
KINDS = ("failed", "cancelled", "anomaly_rate", "drift", "errors")


@dataclass(frozen=True)
class Alarm:
    kind: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "message": self.message}


@dataclass(frozen=True)
class Calibration:
    """What the model's threshold was set on: `n_images` held-out normal images, `n_above` of
    them scoring above the threshold, for a target false-alarm rate `fpr`."""

    n_images: int
    n_above: int
    fpr: float | None

    @classmethod
    def of_model(cls, params: dict[str, Any] | None, threshold: float | None) -> Calibration | None:
        """From models.params (calibration scores, or only their count for older models)."""
        params = params or {}
        calibration = params.get("calibration") or {}
        fpr = (params.get("train") or {}).get("fpr")
        fpr = float(fpr) if isinstance(fpr, (int, float)) else None
        scores = [s for s in calibration.get("scores") or [] if isinstance(s, (int, float))]
        n_images = int(calibration.get("n_images") or len(scores))
        if scores and threshold is not None and len(scores) == n_images:
            return cls(n_images, sum(1 for s in scores if s > threshold), fpr)
        if n_images and fpr is not None:  # scores not kept (or capped): the quantile's own count
            return cls(n_images, math.floor(fpr * n_images), fpr)
        return None


def beta_binomial_tail(k: int, n: int, a: float, b: float) -> float:
    """P(K >= k) for K ~ beta-binomial(n, a, b)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_beta_ab = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def log_pmf(i: int) -> float:
        log_choose = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
        log_beta = math.lgamma(i + a) + math.lgamma(n - i + b) - math.lgamma(n + a + b)
        return log_choose + log_beta - log_beta_ab

    # Summed from the smaller side; terms far below the largest add nothing a decision needs.
    terms = range(k, n + 1) if k > n / 2 else range(k)
    logs = [log_pmf(i) for i in terms]
    top = max(logs)
    mass = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, max(0.0, mass if k > n / 2 else 1.0 - mass))


def anomaly_rate_alarm(n_flagged: int, n_scored: int, calibration: Calibration | None) -> Alarm | None:
    if calibration is None or n_scored == 0 or n_flagged == 0 or calibration.n_images < 1:
        return None
    n_cal, j = calibration.n_images, min(calibration.n_above, calibration.n_images - 1)
    p = beta_binomial_tail(n_flagged, n_scored, j + 1, n_cal - j)
    if p >= ANOMALY_RATE_P:
        return None
    target = f"{calibration.fpr:.1%}" if calibration.fpr is not None else f"{(j + 1) / (n_cal + 1):.1%}"
    return Alarm("anomaly_rate", f"{n_flagged} of {n_scored} images flagged ({n_flagged / n_scored:.1%}); the "
                                 f"threshold was set for {target} on {n_cal} calibration images (chance of as "
                                 f"many: {p:.0e}): another product, camera or lighting, or a real run of defects")


def job_alarms(*, kind: str, status: str, error: str | None, n_total: int, n_scored: int, n_flagged: int,
               n_errors: int, calibration: Calibration | None, drift: Drift | None,
               error_share: float = DEFAULT_ERROR_SHARE) -> list[Alarm]:
    """Every alarm of an ended job, in the order of KINDS."""
    alarms: list[Alarm] = []
    if status == "failed":
        alarms.append(Alarm("failed", error or "the job failed"))
    elif status == "cancelled":
        alarms.append(Alarm("cancelled", error or "the job was cancelled"))
    if kind == "score":
        rate = anomaly_rate_alarm(n_flagged, n_scored, calibration)
        if rate is not None:
            alarms.append(rate)
        if drift is not None and drift.warn and drift.statistic is not None:
            alarms.append(Alarm("drift", f"the normal scores moved from the calibration scores: KS "
                                         f"{drift.statistic:.2f} > 0.3 ({drift.n_night} vs {drift.n_calibration} "
                                         "scores); the false-alarm rate the threshold was set for no longer holds"))
    if kind != "train" and n_total and n_errors / n_total > error_share:
        alarms.append(Alarm("errors", f"{n_errors} of {n_total} files could not be scored ({n_errors / n_total:.1%}, "
                                      f"more than {error_share:.0%}): unreadable, not images, or too large"))
    return alarms
