"""Run a train job: load normal images, fit, calibrate the threshold, save, register a version.

A seeded share of the training images (`calib_fraction`) is held out of fitting; the threshold is
set on their scores for the target false-alarm rate (`fpr`), and the heat-map color range on their
maps. Both are saved in the model file and the `models` row.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any

import numpy as np
import torch
from sqlalchemy import or_, update
from sqlalchemy.exc import IntegrityError
from torch import Tensor
from torch.utils.data import Dataset

from adqueue.data.loader import load_stream
from adqueue.data.sources import Item, open_source
from adqueue.detectors import registry
from adqueue.detectors.base import Detector, Progress
from adqueue.errors import AdqueueError
from adqueue.service.context import Context
from adqueue.service.models import next_version, save_detector
from adqueue.store.models import Job, JobStatus, Model, utcnow
from adqueue.store.writes import end_job

log = logging.getLogger(__name__)

# Settings of the training procedure itself; every other --set key belongs to the detector.
TRAIN_KEYS = {"fpr": 0.01, "calib_fraction": 0.2, "seed": 0, "max_images": 0}
STALE_HEARTBEAT = timedelta(minutes=5)


class TrainOutcome(Enum):
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


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


def split_train_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training-procedure settings with defaults, detector settings)."""
    train = {key: settings.get(key, default) for key, default in TRAIN_KEYS.items()}
    try:
        train = {
            "fpr": float(train["fpr"]),
            "calib_fraction": float(train["calib_fraction"]),
            "seed": int(train["seed"]),
            "max_images": int(train["max_images"]),
        }
    except ValueError as exc:
        raise ValueError(f"invalid training setting: {exc}") from None
    if not 0.0 <= train["fpr"] < 1.0:
        raise ValueError("fpr must be in [0, 1)")
    if not 0.0 <= train["calib_fraction"] < 1.0:
        raise ValueError("calib_fraction must be in [0, 1)")
    detector = {key: value for key, value in settings.items() if key not in TRAIN_KEYS}
    return train, detector


def with_seed(detector: str, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """One `--set seed=N` seeds the holdout split and, if it has a `seed` setting, the detector."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(registry.detector_class(detector).Config)}
    return {**settings, "seed": seed} if "seed" in fields else settings


def run_train_job(ctx: Context, job_id: int, *, progress: Progress, device: torch.device) -> TrainOutcome:
    if not _claim(ctx, job_id):
        return TrainOutcome.SKIPPED
    try:
        with ctx.store.session() as session:
            job = session.get_one(Job, job_id)
            params, source = dict(job.params), job.source
        model_id = _train(ctx, job_id, params, source, progress=progress, device=device)
    except Exception as exc:  # noqa: BLE001 - the job row carries the error
        if not isinstance(exc, (AdqueueError, ValueError)):
            log.error("train job %s failed:\n%s", job_id, traceback.format_exc())
        with ctx.store.session() as session:
            end_job(session, job_id, status=JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        return TrainOutcome.FAILED
    with ctx.store.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(model_id=model_id, phase="done"))
        end_job(session, job_id, status=JobStatus.DONE)
    return TrainOutcome.DONE


def _claim(ctx: Context, job_id: int) -> bool:
    """Take a queued train job, or one whose worker stopped sending heartbeats."""
    stale = utcnow() - STALE_HEARTBEAT
    with ctx.store.session() as session:
        won = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                or_(
                    Job.status == JobStatus.QUEUED,
                    (Job.status == JobStatus.RUNNING) & (Job.heartbeat_at < stale),
                ),
            )
            .values(status=JobStatus.RUNNING, attempts=Job.attempts + 1, started_at=utcnow(), heartbeat_at=utcnow())
        ).rowcount
    return bool(won)


def _train(
    ctx: Context, job_id: int, params: dict[str, Any], source_spec: str, *, progress: Progress, device: torch.device
) -> int:
    train_settings, detector_settings = split_train_settings(params.get("settings", {}))
    torch.manual_seed(train_settings["seed"])
    detector = registry.create(params["detector"], with_seed(params["detector"], detector_settings,
                                                             train_settings["seed"])).to(device)
    items = _training_items(source_spec, params.get("split"), train_settings["max_images"])
    fit_items, calib_items = _holdout(items, train_settings["calib_fraction"], train_settings["seed"])
    fit_pixels, failed = _load_pixels(fit_items, detector, progress)
    calib_pixels, calib_failed = _load_pixels(calib_items, detector, progress, phase="loading calibration images")
    with ctx.store.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(n_failed=failed + calib_failed))
    n_images = len(fit_pixels) + len(calib_pixels)
    if len(fit_pixels) < 2:
        raise AdqueueError(f"only {len(fit_pixels)} readable training image(s) in {source_spec}: need at least 2")
    started = time.perf_counter()
    detector.train()
    report = detector.fit(TensorImages(fit_pixels), progress=progress)
    detector.eval()
    calibration = _calibrate(detector, calib_pixels if len(calib_pixels) else fit_pixels,
                             train_settings["fpr"], progress, in_sample=not len(calib_pixels))
    fit_seconds = time.perf_counter() - started
    extra = {
        "threshold": calibration.threshold,
        "map_range": list(calibration.map_range),
        "fpr": train_settings["fpr"],
        "fit": {"n_images": report.n_images, "seconds": round(fit_seconds, 3),
                "losses": report.losses[-20:], **report.info},
        "calibration": {"n_images": calibration.n_images, "in_sample": calibration.in_sample},
    }
    model_id = _register(ctx, job_id, params, detector, extra, train_settings)
    with ctx.store.session() as session:  # the job's counts: images trained and calibrated on
        session.execute(update(Job).where(Job.id == job_id).values(n_total=n_images + failed + calib_failed,
                                                                     n_done=n_images))
    return model_id


def _training_items(spec: str, split: str | None, max_images: int) -> list[Item]:
    source = open_source(spec, split=split)
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
    items: list[Item], detector: Detector, progress: Progress, phase: str = "loading images"
) -> tuple[Tensor, int]:
    prep = detector.preprocess
    pixels = torch.empty((len(items), prep.channels, prep.size, prep.size), dtype=torch.uint8)
    progress.phase(phase, len(items))
    count = failed = 0
    for entry in load_stream(items, prep):
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
    if map_values:
        values = np.concatenate(map_values)
        map_range = (float(np.percentile(values, 50)), float(values.max()))
    else:
        map_range = (0.0, 1.0)
    return Calibration(detector.calibrate_threshold(all_scores, fpr), map_range, len(all_scores), in_sample)


def _register(
    ctx: Context, job_id: int, params: dict[str, Any], detector: Detector, extra: dict[str, Any],
    train_settings: dict[str, Any],
) -> int:
    name = params["name"]
    for _ in range(5):  # two trainings of one name may race for the next version number
        with ctx.store.session() as session:
            version = next_version(session, name)
        artifact = save_detector(ctx, detector, name=name, version=version, job_id=job_id, extra=extra)
        try:
            with ctx.store.session() as session:
                model = Model(
                    name=name, version=version, detector=detector.name,
                    backbone=getattr(detector.config, "backbone", None),
                    params={"config": detector.config_dict(), "train": train_settings, "fit": extra["fit"],
                            "map_range": extra["map_range"], "calibration": extra["calibration"]},
                    artifact_path=artifact, threshold=extra["threshold"], train_job_id=job_id,
                )
                session.add(model)
                session.flush()
                return model.id
        except IntegrityError:
            continue
    raise AdqueueError(f"could not register a new version of {name}: too many concurrent trainings")
