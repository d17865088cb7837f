"""Train a detector: load defect-free images, fit, calibrate the threshold, check on synthetic defects.

A seeded share of the training images (`calib_fraction`) is held out of fitting; the threshold is
set on their scores for the target false-alarm rate (`fpr`), and the heat-map color range on their
maps (calibrate.py). Guards, so that nobody gets a silently useless model: fitting needs the
detector's `min_fit_images` readable images (`--set min_images=N` overrides it); calibration
refuses scores or a threshold that are not finite and sane; a threshold set on few or in-sample
images is warned about, as is a model that the self-check (self_check.py: synthetic defects
painted into the calibration images) finds blind.

Pure work on files and tensors: the lease, the model file's registration and SQL are the runner's
(adqueue/runners/train.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adqueue.core.errors import AdqueueError
from adqueue.core.progress import Progress
from adqueue.data.loader import load_stream
from adqueue.data.sources import Item, Masks, open_source
from adqueue.detectors import registry
from adqueue.detectors.base import Detector
from adqueue.pipeline.calibrate import calibrate, calibration_warnings
from adqueue.pipeline.images import TensorImages
from adqueue.pipeline.self_check import run_self_check

log = logging.getLogger(__name__)

MAX_STORED_CALIBRATION_SCORES = 5000  # kept in models.params; more adds nothing to a histogram


@dataclass
class TrainingImages:
    """Decoded uint8 images [N, C, H, W] to fit on and to calibrate on, and how many could not be read."""

    fit: Tensor
    calib: Tensor
    unreadable_fit: int
    unreadable_calib: int

    @property
    def n_images(self) -> int:
        return len(self.fit) + len(self.calib)

    @property
    def unreadable(self) -> int:
        return self.unreadable_fit + self.unreadable_calib


@dataclass
class Trained:
    """A fitted, calibrated detector and what is saved and registered with it."""

    detector: Detector
    extra: dict[str, Any]  # threshold, map range, fit report, calibration, self-check, warnings
    counts: dict[str, int]  # the job's n_total / n_done


def new_detector(name: str, settings: dict[str, Any], seed: int, device: Any) -> Detector:
    """An unfitted detector on `device`; one `--set seed=N` seeds torch, the holdout split and, if it
    has a `seed` setting, the detector."""
    torch.manual_seed(seed)
    fields = {f.name for f in dataclasses.fields(registry.detector_class(name).Config)}
    return registry.create(name, {**settings, "seed": seed} if "seed" in fields else settings).to(device)


def training_items(spec: str, split: str | None, max_images: int, allowed_roots: tuple[Path, ...]) -> list[Item]:
    source = open_source(spec, split=split, allowed_roots=allowed_roots)
    masks = Masks(leave_out=True)
    items = [item for item in source.items(masks) if item.label in (None, 0)]
    if masks.count:
        log.info("%s: %s", source.describe(), masks.describe())
    if max_images:
        items = items[:max_images]
    if len(items) < 2:
        raise AdqueueError(f"{source.describe()} has {len(items)} defect-free file(s) to train on: need at least 2")
    return items


def holdout(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    if fraction <= 0 or len(items) < 4:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    n_calib = max(1, round(fraction * len(items)))
    calib = sorted(order[:n_calib].tolist())
    fit = sorted(order[n_calib:].tolist())
    return [items[i] for i in fit], [items[i] for i in calib]


def load_training_images(detector: Detector, items: list[Item], train_settings: dict[str, Any], progress: Progress,
                         *, max_bytes: int) -> TrainingImages:
    """Split `items` into fitting and calibration images and decode both; refuses too few readable
    images to fit on (counted after decoding: a file that is not an image is no training image)."""
    fit_items, calib_items = holdout(items, train_settings["calib_fraction"], train_settings["seed"])
    fit, failed = _load_pixels(fit_items, detector, progress, max_bytes=max_bytes)
    minimum = max(2, train_settings["min_images"] or detector.min_fit_images)
    check_fit_count(detector.name, minimum, n_files=len(fit_items), n_readable=len(fit), n_held_out=len(calib_items))
    calib, calib_failed = _load_pixels(calib_items, detector, progress, phase="loading calibration images",
                                       max_bytes=max_bytes)
    return TrainingImages(fit, calib, failed, calib_failed)


def fit_and_calibrate(detector: Detector, images: TrainingImages, train_settings: dict[str, Any], progress: Progress,
                      ) -> Trained:
    """Fit on `images.fit`, calibrate on `images.calib` (on the fitting images when there are none),
    run the self-check; the warnings are kept with the model (the runner logs them)."""
    fit_pixels, calib_pixels = images.fit, images.calib
    started = time.perf_counter()
    detector.train()
    report = detector.fit(TensorImages(fit_pixels), progress=progress)
    detector.eval()
    calib_on = calib_pixels if len(calib_pixels) else fit_pixels
    calibration = calibrate(detector, calib_on, train_settings["fpr"], progress, in_sample=not len(calib_pixels))
    fit_seconds = time.perf_counter() - started
    check = run_self_check(detector, calib_on, calibration.raw_scores, progress, seed=train_settings["seed"],
                           in_sample=calibration.in_sample)
    warnings = calibration_warnings(calibration, train_settings["calib_fraction"]) + check.warnings()
    extra = {
        "threshold": calibration.threshold,
        "map_range": list(calibration.map_range),
        "fpr": train_settings["fpr"],
        "fit": {"n_images": report.n_images, "seconds": round(fit_seconds, 3),
                "losses": report.losses[-20:], **report.info},
        # The scores themselves: what a night's normal scores are compared with (drift, histograms).
        "calibration": {"n_images": calibration.n_images, "in_sample": calibration.in_sample,
                        "scores": calibration.scores[:MAX_STORED_CALIBRATION_SCORES]},
        "self_check": check.as_params(),
        "warnings": warnings,
    }
    counts = {"n_total": images.n_images + images.unreadable, "n_done": images.n_images}  # trained and calibrated on
    return Trained(detector, extra, counts)


def check_fit_count(detector: str, minimum: int, *, n_files: int, n_readable: int, n_held_out: int) -> None:
    """Refuse to fit on fewer readable images than `minimum`: such a model scores no better than
    chance. The message counts images, not files, and says where the others went."""
    if n_readable >= minimum:
        return
    unreadable = n_files - n_readable
    found = (f": {n_readable} of the {n_files} files are readable images ({unreadable} are not images or "
             "unreadable)" if unreadable else f", got {n_readable}")
    held = f"; {n_held_out} more files are held out to calibrate the threshold" if n_held_out else ""
    hint = f"--set min_images={n_readable} to train anyway" if n_readable >= 2 else "add defect-free images"
    raise AdqueueError(f"{detector} needs at least {minimum} defect-free images to fit{found}{held}; {hint}")


def _load_pixels(
    items: list[Item], detector: Detector, progress: Progress, phase: str = "loading images", *, max_bytes: int,
) -> tuple[Tensor, int]:
    prep = detector.preprocess
    pixels = torch.empty((len(items), prep.channels, prep.size, prep.size), dtype=torch.uint8)
    progress.phase(phase, len(items))
    count = failed = 0
    for entry in load_stream(items, prep, max_bytes=max_bytes):
        if entry.decoded is None:
            log.warning("skipping unreadable training image %s: %s", entry.item.path, entry.error)
            failed += 1
        else:
            pixels[count] = torch.from_numpy(entry.decoded.pixels).permute(2, 0, 1)
            count += 1
        progress.advance()
    return pixels[:count], failed
