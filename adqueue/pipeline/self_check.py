"""Training self-check: does the fitted model tell its held-out images from the same images with
synthetic defects painted in? Needs no labeled defects, so every training gets one.

The clean side is the calibration images' scores, which `_calibrate` already computed; the
defective side is one painted copy per calibration image (defect kinds in turn, see
adqueue/data/synthetic_defects.py), scored once without maps: about one more pass over the
calibration set, at least MIN_DEFECTED copies so that a small set still has a few of each kind,
at most MAX_DEFECTED so that a large one costs no more than an AUROC needs.

The result is an image AUROC (clean = 0, painted = 1), overall and per kind, stored as metrics of
the model and in its params. Synthetic defects are not the line's defects: a high figure is no
promise, but a model that cannot find a pasted patch or a scratch in its own kind of image is
rarely better on real ones, so a low figure becomes a training warning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from adqueue.core.progress import Progress
from adqueue.data.synthetic_defects import KINDS, paint
from adqueue.detectors.base import Detector
from adqueue.pipeline.metrics import image_auroc

METRIC = "synthetic_auroc"  # and "synthetic_auroc.<kind>"
DATASET = "synthetic"  # metrics.dataset of its rows
MIN_DEFECTED = 4 * len(KINDS)
MAX_DEFECTED = 256  # the AUROC's standard error is about 0.02 by then
# Below this, a training warning. Measured (benchmarks/detectors.py; real = evaluate's image AUROC):
# models that rank real defects no better than chance scored 0.45 (differnet on battery welds, real
# 0.44) and 0.56-0.63 over four seeds (mvg fitted on 8 battery-weld images, real 0.23); useful ones
# 0.76-0.84 over three seeds (mvg on battery welds, real 0.98: only 7 held-out images, of very uneven
# scores), 0.86 (patchcore on battery welds, real 0.97) and 0.97 (mvg on MTD, real 0.96).
LOW_AUROC = 0.7
BATCH = 16


@dataclass
class SelfCheck:
    auroc: float | None
    per_kind: dict[str, float | None]
    n_clean: int
    n_defected: int
    seconds: float
    seed: int
    in_sample: bool = False  # the clean images are the training images (no hold-out): flattering

    def warnings(self) -> list[str]:
        if self.auroc is None or self.auroc >= LOW_AUROC:
            return []
        kinds = ", ".join(f"{kind} {value:.2f}" for kind, value in self.per_kind.items() if value is not None)
        return [f"self-check: AUROC {self.auroc:.2f} (below {LOW_AUROC}) on synthetic defects painted into the "
                f"{self.n_clean} calibration images ({kinds}): the model may miss real defects too; evaluate it "
                "on labeled ones before relying on it"]

    def as_params(self) -> dict[str, Any]:
        return {"auroc": self.auroc, "per_kind": self.per_kind, "n_clean": self.n_clean,
                "n_defected": self.n_defected, "seconds": round(self.seconds, 3), "seed": self.seed,
                "in_sample": self.in_sample, "low_auroc": LOW_AUROC}


@torch.no_grad()
def run_self_check(detector: Detector, pixels: Tensor, clean_scores: np.ndarray, progress: Progress, *,
                   seed: int, in_sample: bool = False) -> SelfCheck:
    """Score painted copies of `pixels` (uint8 [N, C, H, W], whose scores are `clean_scores`)."""
    started = time.perf_counter()
    plan = defect_plan(len(pixels))
    progress.phase("self-check on synthetic defects", len(plan))
    scores: list[np.ndarray] = []
    for start in range(0, len(plan), BATCH):
        chunk = plan[start:start + BATCH]
        images = pixels[[image for image, _, _ in chunk]].float().div_(255.0)
        donors = pixels[[donor for _, donor, _ in chunk]].float().div_(255.0)
        painted = paint(images, [kind for _, _, kind in chunk], seed=seed,
                        indices=range(start, start + len(chunk)), donors=donors)
        result = detector.score(painted.images.to(detector.device), with_maps=False)
        scores.append(result.image.numpy().astype(np.float64))
        progress.advance(len(chunk))
    defected = np.concatenate(scores)
    kinds = np.array([kind for _, _, kind in plan])
    per_kind = {kind: _auroc(clean_scores, defected[kinds == kind]) for kind in KINDS}
    return SelfCheck(_auroc(clean_scores, defected), per_kind, len(clean_scores), len(defected),
                     time.perf_counter() - started, seed, in_sample)


def defect_plan(n_images: int) -> list[tuple[int, int, str]]:
    """(image, cutpaste donor, kind) for each painted copy: every image once (more for small sets,
    each copy with another kind), kinds in turn, the donor another image of the set."""
    if n_images < 1:
        return []
    count = min(max(n_images, MIN_DEFECTED), MAX_DEFECTED)
    plan = []
    for i in range(count):
        image, lap = i % n_images, i // n_images
        donor = (image + 1 + lap % (n_images - 1)) % n_images if n_images > 1 else image
        plan.append((image, donor, KINDS[(image + lap) % len(KINDS)]))
    return plan


def _auroc(clean: np.ndarray, defected: np.ndarray) -> float | None:
    """AUROC on ranks: an infinite score ranks highest, a NaN one counts as not found (lowest)."""
    if not len(clean) or not len(defected):
        return None
    values = np.concatenate([clean, defected]).astype(np.float64)
    ranks = rankdata(np.where(np.isnan(values), -np.inf, values))
    labels = np.concatenate([np.zeros(len(clean), dtype=int), np.ones(len(defected), dtype=int)])
    auroc = image_auroc(labels, ranks)
    return None if auroc is None else round(auroc, 6)
