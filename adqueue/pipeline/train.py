"""Run a train job: load normal images, fit, calibrate the threshold, save, register a version.

A seeded share of the training images (`calib_fraction`) is held out of fitting; the threshold is
set on their scores for the target false-alarm rate (`fpr`), and the heat-map color range on their
maps. Both are saved in the model file and the `models` row.

Guards, so that nobody gets a silently useless model: settings are checked at submission; fitting
needs the detector's `min_fit_images` readable images (`--set min_images=N` overrides it); a model
whose calibration scores or threshold are not finite and sane is not registered; and a threshold
set on few or in-sample images registers with warnings (logged, and kept in params["warnings"]), as
does one that the self-check (service/self_check.py: synthetic defects painted into the calibration
images) finds blind; the self-check's AUROCs are stored as metrics of the model.

The training runs under a lease renewed with its progress. A worker lost mid-training (killed,
out of memory) stops renewing; the reconciler then queues the job again, up to `max_attempts`
runs. A run that lost its lease registers nothing, and the model row is written in the same
transaction as the guarded end of the job.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from torch import Tensor
from torch.utils.data import Dataset

from adqueue.data.loader import load_stream
from adqueue.data.paths import to_os
from adqueue.data.sources import Item, open_source
from adqueue.detectors import registry
from adqueue.detectors.base import Detector
from adqueue.core.errors import AdqueueError
from adqueue.core.progress import Progress
from adqueue.jobs.context import Context
from adqueue.jobs.leases import DB_RETRY_S, JobProgress, LeaseLost, lease_until
from adqueue.pipeline.model_files import file_sha256, next_version, save_detector
from adqueue.pipeline.self_check import metric_rows, run_self_check
from adqueue.jobs.train_settings import split_train_settings
from adqueue.store.models import Job, JobStatus, Model
from adqueue.store.transitions import ClaimedJob, claim_train, end_job_run, renew_job_lease

log = logging.getLogger(__name__)

MAX_STORED_CALIBRATION_SCORES = 5000  # kept in models.params; more adds nothing to a histogram

# Below this many held-out images a quantile threshold moves by whole images: with 7, one image
# is 14% of the calibration set, so the realized false-alarm rate is a rough guess.
MIN_CALIB_IMAGES = 20


class TrainOutcome(Enum):
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # done already, or held by a live run: a duplicate delivery
    LOST = "lost"  # cancelled, or taken over after its lease expired: registered nothing


class TensorImages(Dataset[Tensor]):
    """Decoded uint8 images [N, C, H, W] served as float [C, H, W] in [0, 1]."""

    def __init__(self, pixels: Tensor) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        return self.pixels[index].float().div_(255.0)


@dataclass
class Calibration:
    threshold: float
    map_range: tuple[float, float]
    n_images: int
    in_sample: bool
    scores: list[float] = field(default_factory=list)
    raw_scores: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)  # unrounded, for the self-check


def with_seed(detector: str, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """One `--set seed=N` seeds the holdout split and, if it has a `seed` setting, the detector."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(registry.detector_class(detector).Config)}
    return {**settings, "seed": seed} if "seed" in fields else settings


def run_train_job(
    ctx: Context, job_id: int, *, worker: str, device: torch.device, display: Progress | None = None
) -> TrainOutcome:
    held = ctx.store.transaction(lambda session: claim_train(session, job_id, worker, lease_until=lease_until(ctx)),
                                 retry_s=DB_RETRY_S)
    if held is None:
        return TrainOutcome.SKIPPED
    if held.attempts > ctx.settings.max_attempts:
        error = f"gave up after {held.attempts - 1} attempt(s): the worker training it was lost each time"
        with ctx.store.session() as session:
            end_job_run(session, held, status=JobStatus.FAILED, error=error)
        return TrainOutcome.FAILED
    progress = JobProgress(ctx, held, display)
    try:
        with ctx.store.session() as session:
            job = session.get_one(Job, job_id)
            params, source = dict(job.params), job.source
        _train(ctx, held, params, source, progress=progress, device=device)
    except LeaseLost as exc:
        log.warning("train job %s: %s; nothing was registered", job_id, exc)
        return TrainOutcome.LOST
    except Exception as exc:  # noqa: BLE001 - the job row carries the error
        if not isinstance(exc, (AdqueueError, ValueError)):
            log.error("train job %s failed:\n%s", job_id, traceback.format_exc())
        with ctx.store.session() as session:
            end_job_run(session, held, status=JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        return TrainOutcome.FAILED
    return TrainOutcome.DONE


def _train(
    ctx: Context, held: ClaimedJob, params: dict[str, Any], source_spec: str, *, progress: JobProgress,
    device: torch.device,
) -> int:
    train_settings, detector_settings = split_train_settings(params.get("settings", {}))
    torch.manual_seed(train_settings["seed"])
    detector = registry.create(params["detector"], with_seed(params["detector"], detector_settings,
                                                             train_settings["seed"])).to(device)
    items = _training_items(to_os(source_spec), params.get("split"), train_settings["max_images"],
                            ctx.settings.allowed_roots)
    fit_items, calib_items = _holdout(items, train_settings["calib_fraction"], train_settings["seed"])
    minimum = train_settings["min_images"] or detector.min_fit_images
    check_fit_count(detector.name, len(fit_items), minimum)  # before loading: it can only shrink
    max_bytes = ctx.settings.max_file_bytes
    fit_pixels, failed = _load_pixels(fit_items, detector, progress, max_bytes=max_bytes)
    calib_pixels, calib_failed = _load_pixels(calib_items, detector, progress, phase="loading calibration images",
                                              max_bytes=max_bytes)
    with ctx.store.session() as session:
        if not renew_job_lease(session, held, lease_until(ctx), n_failed=failed + calib_failed):
            raise LeaseLost(f"train job {held.job_id} lost its lease while loading images")
    n_images = len(fit_pixels) + len(calib_pixels)
    if len(fit_pixels) < 2:
        raise AdqueueError(f"only {len(fit_pixels)} readable training image(s) in {source_spec}: need at least 2")
    check_fit_count(detector.name, len(fit_pixels), minimum, unreadable=failed)
    started = time.perf_counter()
    detector.train()
    report = detector.fit(TensorImages(fit_pixels), progress=progress)
    detector.eval()
    calib_on = calib_pixels if len(calib_pixels) else fit_pixels
    calibration = _calibrate(detector, calib_on, train_settings["fpr"], progress, in_sample=not len(calib_pixels))
    fit_seconds = time.perf_counter() - started
    check = run_self_check(detector, calib_on, calibration.raw_scores, progress, seed=train_settings["seed"],
                           in_sample=calibration.in_sample)
    warnings = calibration_warnings(calibration, train_settings["calib_fraction"]) + check.warnings()
    for warning in warnings:
        log.warning("train job %s: %s", held.job_id, warning)
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
    counts = {"n_total": n_images + failed + calib_failed, "n_done": n_images}  # trained and calibrated on
    return _register(ctx, held, params, detector, extra, train_settings, counts)


def check_fit_count(detector: str, n_fit: int, minimum: int, *, unreadable: int = 0) -> None:
    """Refuse to fit on fewer images than `minimum`: such a model scores no better than chance."""
    if n_fit >= minimum:
        return
    skipped = f" ({unreadable} unreadable skipped)" if unreadable else ""
    raise AdqueueError(f"{detector} needs at least {minimum} defect-free images to fit, got {n_fit}{skipped}; "
                       f"--set min_images={n_fit} to train anyway")


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


def _training_items(spec: str, split: str | None, max_images: int, allowed_roots: tuple[Path, ...]) -> list[Item]:
    source = open_source(spec, split=split, allowed_roots=allowed_roots)
    items = [item for item in source.items() if item.label in (None, 0)]
    if max_images:
        items = items[:max_images]
    if len(items) < 2:
        raise AdqueueError(f"{source.describe()} has {len(items)} defect-free image(s): need at least 2")
    return items


def _holdout(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    if fraction <= 0 or len(items) < 4:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    n_calib = max(1, round(fraction * len(items)))
    calib = sorted(order[:n_calib].tolist())
    fit = sorted(order[n_calib:].tolist())
    return [items[i] for i in fit], [items[i] for i in calib]


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


@torch.no_grad()
def _calibrate(detector: Detector, pixels: Tensor, fpr: float, progress: Progress, *, in_sample: bool) -> Calibration:
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
    check_threshold(threshold, all_scores, extrapolates=own_threshold_rule(detector))
    return Calibration(threshold, map_range, len(all_scores), in_sample, [round(float(v), 6) for v in all_scores],
                       all_scores)


def check_scores_finite(scores: np.ndarray) -> None:
    """A NaN or infinite normal score means a broken fit (overflow, diverged training): refuse it."""
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise AdqueueError(f"the model's scores on the {len(scores)} calibration images are not finite "
                           f"({bad} of {len(scores)}): nothing was registered")


def own_threshold_rule(detector: Detector) -> bool:
    """True when the detector replaces the empirical quantile with a rule of its own (which may
    extrapolate beyond the scores, like encoder_flow's Gaussian bound)."""
    return type(detector).calibrate_threshold is not Detector.calibrate_threshold


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


def _register(
    ctx: Context, held: ClaimedJob, params: dict[str, Any], detector: Detector, extra: dict[str, Any],
    train_settings: dict[str, Any], counts: dict[str, int],
) -> int:
    """Save the model file, then add the model row and end the job in one guarded transaction."""
    name = params["name"]
    for _ in range(5):  # two trainings of one name may race for the next version number
        with ctx.store.session() as session:
            version = next_version(session, name)
        artifact = save_detector(ctx, detector, name=name, version=version, job_id=held.job_id, extra=extra)

        def register(session: Any, version: int = version, artifact: str = artifact) -> int:
            model = Model(
                name=name, version=version, detector=detector.name,
                backbone=getattr(detector.config, "backbone", None),
                params={"config": detector.config_dict(), "train": train_settings, "fit": extra["fit"],
                        "map_range": extra["map_range"], "calibration": extra["calibration"],
                        "self_check": extra["self_check"], "warnings": extra["warnings"]},
                artifact_path=artifact, threshold=extra["threshold"], train_job_id=held.job_id,
                artifact_sha256=file_sha256(ctx.data_dir.resolve(artifact)),
            )
            session.add(model)
            session.flush()
            session.add_all(metric_rows(model.id, held.job_id, extra["self_check"]))
            if not end_job_run(session, held, status=JobStatus.DONE, model_id=model.id, phase="done", **counts):
                raise LeaseLost(f"train job {held.job_id} lost its lease before registering")
            return model.id

        try:
            return ctx.store.transaction(register, retry_s=DB_RETRY_S)
        except IntegrityError:
            ctx.data_dir.resolve(artifact).unlink(missing_ok=True)
            continue
        except LeaseLost:
            with ctx.store.session() as session:  # a retried commit may have registered it after all
                registered = session.scalar(select(Model.id).where(Model.artifact_path == artifact))
            if registered is None:
                ctx.data_dir.resolve(artifact).unlink(missing_ok=True)
                raise
            return registered
    raise AdqueueError(f"could not register a new version of {name}: too many concurrent trainings")
