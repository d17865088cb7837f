"""Metrics of an evaluate job, from its scored images and the anomaly maps its shards saved.

Image AUROC (overall, per defect type, per extra score), pixel AUROC and PRO where masks exist,
false-alarm rate and recall at the model's threshold.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adqueue.core.errors import ImageError
from adqueue.core.progress import NullProgress, Progress
from adqueue.data.io import read_mask
from adqueue.data.paths import to_os
from adqueue.pipeline.metrics import image_auroc, pixel_auroc, pro_score, rates_at_threshold

log = logging.getLogger(__name__)

# Pixel metrics hold every map pixel at once; past this budget the maps (and masks) are strided
# down by a common factor, which keeps memory bounded for very large evaluation sets.
PIXEL_BUDGET = 40_000_000


@dataclass(frozen=True)
class EvaluatedImage:
    """One scored, labeled image of an evaluate job, as its result row has it."""

    path: str
    label: int
    defect: str | None
    score: float
    scores: dict[str, Any] | None  # every score the detector offers


def compute_metrics(rows: Sequence[EvaluatedImage], masks: dict[str, str | None], map_files: list[Path],
                    threshold: float | None, progress: Progress | None = None) -> dict[str, float]:
    """From scratch, every time: a second run computes exactly what the first would have. `masks`
    maps each image's path to its mask's (or None); `map_files` are the shards' saved maps."""
    progress = progress or NullProgress()
    labels = np.array([row.label for row in rows], dtype=int)
    scores = np.array([row.score for row in rows], dtype=np.float64)
    metrics: dict[str, float] = {
        "n_images": float(len(rows)),
        "n_normal": float((labels == 0).sum()),
        "n_defective": float((labels == 1).sum()),
    }
    _put(metrics, "image_auroc", image_auroc(labels, scores))
    for name, values in _extra_scores(rows).items():
        _put(metrics, f"image_auroc.{name}", image_auroc(labels, values))
    by_defect: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if row.label == 1:
            by_defect[row.defect or "defective"].append(index)
    normal = np.flatnonzero(labels == 0)
    for defect, indices in sorted(by_defect.items()):
        picked = np.concatenate([normal, np.array(indices)])
        _put(metrics, f"image_auroc[{defect}]", image_auroc(labels[picked], scores[picked]))
    if threshold is not None:
        metrics["threshold"] = float(threshold)
        rates = rates_at_threshold(labels, scores, threshold)
        _put(metrics, "false_alarm_rate", rates.false_alarm_rate)
        _put(metrics, "recall", rates.recall)
    metrics.update(_pixel_metrics(map_files, {row.path: row.label for row in rows}, masks, progress))
    return metrics


def _put(metrics: dict[str, float], name: str, value: float | None) -> None:
    if value is not None:
        metrics[name] = float(value)


def _extra_scores(rows: Sequence[EvaluatedImage]) -> dict[str, np.ndarray]:
    names = sorted({name for row in rows for name in (row.scores or {})})
    return {
        name: np.array([(row.scores or {}).get(name, np.nan) for row in rows], dtype=np.float64)
        for name in names
        if all(name in (row.scores or {}) for row in rows)
    }


def _pixel_metrics(
    files: list[Path], labels: dict[str, int], masks: dict[str, str | None], progress: Progress
) -> dict[str, float]:
    """Pixel AUROC and PRO over images whose ground truth is known (normal, or with a mask)."""
    maps_list: list[np.ndarray] = []
    masks_list: list[np.ndarray] = []
    files = [file for file in files if file.is_file()]  # a shard on a full disk saved none
    stride = _stride(files)
    unreadable = 0
    seen: set[str] = set()
    progress.phase("reading anomaly maps", len(files))
    for file in files:
        progress.advance()
        with np.load(file) as saved:
            for stored_path, amap in zip(saved["paths"], saved["maps"][:, ::stride, ::stride], strict=True):
                path = str(stored_path)
                seen.add(path)
                label = labels.get(path)
                mask_path = masks.get(path)
                if label is None or (label == 1 and not mask_path):
                    continue
                size = (amap.shape[1], amap.shape[0])
                if label == 1 and mask_path:
                    try:
                        truth = read_mask(to_os(mask_path), size)
                    except ImageError as exc:  # one bad mask leaves one image out, not the job failed
                        log.warning("%s; its image is left out of the pixel metrics", exc)
                        unreadable += 1
                        continue
                elif label == 0:
                    truth = np.zeros(amap.shape, dtype=bool)
                else:
                    continue
                maps_list.append(amap.astype(np.float32))
                masks_list.append(truth)
    out: dict[str, float] = {"n_unreadable_masks": float(unreadable)} if unreadable else {}
    # Pixel metrics need ground truth (a normal image, or a mask) and the image's saved map.
    truth_known = {path for path, label in labels.items() if label == 0 or masks.get(path)}
    if any(masks.get(path) for path in truth_known) and (missing := len(truth_known - seen)):
        out["n_images_without_maps"] = float(missing)
    if not maps_list or not any(mask.any() for mask in masks_list):
        return out
    maps = np.stack(maps_list)
    truths = np.stack(masks_list)
    progress.phase("pixel metrics", 1)
    out["n_pixel_images"] = float(len(maps_list))
    _put(out, "pixel_auroc", pixel_auroc(maps, truths))
    _put(out, "pro", pro_score(maps, truths))
    return out


def _stride(files: list[Path]) -> int:
    pixels = 0
    for file in files:
        with np.load(file) as saved:
            count, height, width = (int(v) for v in saved["shape"])  # reads no map data
            pixels += count * height * width
    return max(1, int(np.ceil(np.sqrt(pixels / PIXEL_BUDGET))))
