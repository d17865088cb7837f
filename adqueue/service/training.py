"""Run a train job: load normal images, fit, calibrate the threshold, save, register a version.

A seeded share of the training images (`calib_fraction`) is held out of fitting; the threshold is
set on their scores for the target false-alarm rate (`fpr`), and the heat-map color range on their
maps. Both are saved in the model file and the `models` row.

The training runs under a lease renewed with its progress. A worker lost mid-training (killed,
out of memory) stops renewing; the reconciler then queues the job again, up to `max_attempts`
runs. A run that lost its lease registers nothing, and the model row is written in the same
transaction as the guarded end of the job.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from torch import Tensor
from torch.utils.data import Dataset

from adqueue.data.loader import load_stream
from adqueue.data.sources import Item, open_source
from adqueue.detectors import registry
from adqueue.detectors.base import Detector, Progress
from adqueue.errors import AdqueueError
from adqueue.service.context import Context
from adqueue.service.leases import DB_RETRY_S, JobProgress, LeaseLost, lease_until
from adqueue.service.models import next_version, save_detector
from adqueue.store.models import Job, JobStatus, Model
from adqueue.store.writes import ClaimedJob, claim_train, end_job_run, renew_job_lease

log = logging.getLogger(__name__)

# Settings of the training procedure itself; every other --set key belongs to the detector.
TRAIN_KEYS = {"fpr": 0.01, "calib_fraction": 0.2, "seed": 0, "max_images": 0}


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
    items = _training_items(source_spec, params.get("split"), train_settings["max_images"])
    fit_items, calib_items = _holdout(items, train_settings["calib_fraction"], train_settings["seed"])
    fit_pixels, failed = _load_pixels(fit_items, detector, progress)
    calib_pixels, calib_failed = _load_pixels(calib_items, detector, progress, phase="loading calibration images")
    with ctx.store.session() as session:
        if not renew_job_lease(session, held, lease_until(ctx), n_failed=failed + calib_failed):
            raise LeaseLost(f"train job {held.job_id} lost its lease while loading images")
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
    counts = {"n_total": n_images + failed + calib_failed, "n_done": n_images}  # trained and calibrated on
    return _register(ctx, held, params, detector, extra, train_settings, counts)


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
                        "map_range": extra["map_range"], "calibration": extra["calibration"]},
                artifact_path=artifact, threshold=extra["threshold"], train_job_id=held.job_id,
            )
            session.add(model)
            session.flush()
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
