"""Run a train job under a lease: the training pipeline, then the model file and its registration.

A worker lost mid-training (killed, out of memory) stops renewing its lease; the reconciler then
queues the job again, up to `max_attempts` runs. A run that lost its lease registers nothing: the
model row and the self-check's metrics are written in the same transaction as the guarded end of
the job.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adqueue.core.errors import AdqueueError
from adqueue.core.hashing import file_sha256
from adqueue.core.logs import OUTCOME
from adqueue.core.progress import Progress
from adqueue.data.paths import to_os
from adqueue.jobs.context import Context
from adqueue.jobs.leases import DB_RETRY_S, JobProgress, LeaseLost, lease_until
from adqueue.jobs.train_settings import split_train_settings
from adqueue.pipeline.device import accelerate
from adqueue.pipeline.model_files import save_detector
from adqueue.pipeline.self_check import DATASET, METRIC
from adqueue.pipeline.train import Trained, fit_and_calibrate, load_training_images, new_detector, training_items
from adqueue.runners.lease import JobRun, Outcome
from adqueue.store.models import Job, JobStatus, Metric, Model
from adqueue.store.queries import next_version
from adqueue.store.transitions import ClaimedJob, claim_train, end_job_run, renew_job_lease

log = logging.getLogger(__name__)


class TrainRun(JobRun):
    def __init__(self, ctx: Context, job_id: int, *, worker: str, device: Any, display: Progress | None) -> None:
        super().__init__(ctx, job_id, worker=worker)
        self.device = device
        self.display = display

    def claim(self, session: Session) -> ClaimedJob | None:
        return claim_train(session, self.job_id, self.worker, lease_until=lease_until(self.ctx))

    def give_up_reason(self, held: ClaimedJob) -> str:
        return f"gave up after {held.attempts - 1} attempt(s): the worker training it was lost each time"

    def work(self, held: ClaimedJob) -> Outcome:
        ctx = self.ctx
        progress = JobProgress(ctx, held, self.display)
        with ctx.store.session() as session:
            job = session.get_one(Job, self.job_id)
            params, source = dict(job.params), job.source
        train_settings, detector_settings = split_train_settings(params.get("settings", {}))
        detector = new_detector(params["detector"], detector_settings, train_settings["seed"], self.device)
        accelerate(detector, ctx.settings, self.device)
        items = training_items(to_os(source), params.get("split"), train_settings["max_images"],
                               ctx.settings.allowed_roots)
        images = load_training_images(detector, items, train_settings, progress, max_bytes=ctx.settings.max_file_bytes)
        with ctx.store.session() as session:
            if not renew_job_lease(session, held, lease_until(ctx), n_failed=images.unreadable):
                raise LeaseLost(f"train job {held.job_id} lost its lease while loading images")
        trained = fit_and_calibrate(detector, images, train_settings, progress)
        register(ctx, held, params, trained, train_settings)
        for warning in trained.extra["warnings"]:  # a terminal that ran it prints them from the model row
            log.warning("train job %s: %s", held.job_id, warning, extra=OUTCOME)
        return Outcome.DONE

    def lost(self, held: ClaimedJob, exc: LeaseLost) -> None:
        log.warning("train job %s: %s; nothing was registered", self.job_id, exc)

    def failed(self, held: ClaimedJob, exc: Exception) -> Outcome:
        # The job's error is read by people (adqueue jobs, the web page): plain words, no class names.
        if isinstance(exc, (AdqueueError, ValueError)):
            return self.fail_job(held, str(exc))
        log.error("train job %s failed:\n%s", self.job_id, traceback.format_exc())
        return self.fail_job(held, f"training failed unexpectedly: {exc or type(exc).__name__}; "
                                   "the log has the traceback")


def run_train_job(ctx: Context, job_id: int, *, worker: str, device: Any, display: Progress | None = None) -> Outcome:
    return TrainRun(ctx, job_id, worker=worker, device=device, display=display).run()


def register(ctx: Context, held: ClaimedJob, params: dict[str, Any], trained: Trained,
             train_settings: dict[str, Any]) -> int:
    """Save the model file, then add the model row and end the job in one guarded transaction."""
    name, detector, extra = params["name"], trained.detector, trained.extra
    for _ in range(5):  # two trainings of one name may race for the next version number
        with ctx.store.session() as session:
            version = next_version(session, name)
        artifact = save_detector(ctx.data_dir, detector, name=name, version=version, job_id=held.job_id, extra=extra)

        def add_model(session: Session, version: int = version, artifact: str = artifact) -> int:
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
            session.add_all(self_check_metrics(model.id, held.job_id, extra["self_check"]))
            if not end_job_run(session, held, status=JobStatus.DONE, model_id=model.id, phase="done",
                               n_total=trained.counts["n_total"], n_done=trained.counts["n_done"]):
                raise LeaseLost(f"train job {held.job_id} lost its lease before registering")
            return model.id

        try:
            return ctx.store.transaction(add_model, retry_s=DB_RETRY_S)
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


def self_check_metrics(model_id: int, job_id: int, check: dict[str, Any]) -> list[Metric]:
    """The self-check (as stored in params) as metrics rows of the model and its train job."""
    values = {METRIC: check.get("auroc"),
              **{f"{METRIC}.{kind}": value for kind, value in (check.get("per_kind") or {}).items()}}
    return [Metric(model_id=model_id, job_id=job_id, name=name, value=value, dataset=DATASET)
            for name, value in values.items()]
