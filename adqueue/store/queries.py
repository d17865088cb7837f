"""The read side for the CLI and the submitters: model references, job summaries, results, models,
metrics, leases held."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from adqueue.core.clock import aware, utcnow
from adqueue.core.errors import AdqueueError, JobNotFound, ModelNotFound
from adqueue.store.models import Job, JobKind, JobStatus, JobSummary, Metric, Model, Result, Run, Shard, ShardStatus


def parse_ref(ref: str) -> tuple[str, int | None]:
    name, sep, version = ref.partition(":")
    if not name:
        raise ModelNotFound(f"invalid model reference {ref!r}: use NAME or NAME:VERSION")
    if not sep:
        return name, None
    try:
        return name, int(version.lstrip("v"))
    except ValueError:
        raise ModelNotFound(f"invalid model version in {ref!r}: use NAME:VERSION, e.g. {name}:1") from None


def resolve_model(session: Session, ref: str) -> Model:
    """The model row for `NAME` (latest version) or `NAME:VERSION`."""
    name, version = parse_ref(ref)
    query = select(Model).where(Model.name == name)
    query = query.where(Model.version == version) if version is not None else query.order_by(Model.version.desc())
    model = session.scalars(query.limit(1)).first()
    if model is None:
        known = session.scalars(select(Model.name).distinct().order_by(Model.name)).all()
        hint = f"; known models: {', '.join(known)}" if known else "; no model has been trained yet"
        what = f"{name}:{version}" if version is not None else name
        raise ModelNotFound(f"no model {what}{hint}")
    return model


def next_version(session: Session, name: str) -> int:
    current = session.scalar(select(func.max(Model.version)).where(Model.name == name))
    return (current or 0) + 1


def job_summary(session: Session, job_id: int) -> dict[str, Any]:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    shard_counts = dict(
        session.execute(
            select(Shard.status, func.count()).where(Shard.job_id == job_id).group_by(Shard.status)
        ).all()
    )
    model = session.get(Model, job.model_id) if job.model_id else None
    return {
        "job_id": job.id,
        "kind": job.kind,
        "status": job.status,
        "model": f"{model.name}:{model.version}" if model else None,
        "source": job.source,
        "n_total": job.n_total,
        "n_done": job.n_done,
        "n_failed": job.n_failed,
        "n_skipped": job.n_skipped,
        "n_heatmaps_unwritten": job.n_heatmaps_unwritten,
        "n_eval_maps_unwritten": job.n_eval_maps_unwritten,
        "unwritten": unwritten_note(job),
        "phase": job.phase,
        "shards": sum(shard_counts.values()),
        "shards_queued": shard_counts.get(ShardStatus.QUEUED, 0),
        "shards_running": shard_counts.get(ShardStatus.RUNNING, 0),
        "shards_done": shard_counts.get(ShardStatus.DONE, 0),
        "shards_failed": shard_counts.get(ShardStatus.FAILED, 0),
        "shards_cancelled": shard_counts.get(ShardStatus.CANCELLED, 0),
        "attempts": job.attempts,
        "queue": job.queue,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": job.error,
    }


def count_if(condition: Any) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


@dataclass(frozen=True)
class JobRow:
    id: int
    kind: str
    status: str
    model_id: int | None
    model_name: str | None
    model_version: int | None
    source: str
    n_total: int
    n_done: int
    n_failed: int
    n_skipped: int
    phase: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    n_scored: int = 0  # result rows with a score
    n_flagged: int = 0
    n_errors: int = 0  # result rows with an error
    # False: a score or evaluate job whose summary is not built yet (the reconciler builds it); its
    # result counts read 0 until then.
    summarized: bool = True

    @property
    def model(self) -> str | None:
        return f"{self.model_name}:{self.model_version}" if self.model_name else None

    @property
    def active(self) -> bool:
        return self.status in JobStatus.ACTIVE

    @property
    def progress(self) -> int:
        return self.n_done + self.n_failed

    @property
    def anomaly_rate(self) -> float | None:
        return self.n_flagged / self.n_scored if self.n_scored else None

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or utcnow()
        return max(0.0, (aware(end) - aware(self.started_at)).total_seconds())

    @property
    def images_per_s(self) -> float | None:
        duration = self.duration_s
        return self.progress / duration if duration else None

    def as_dict(self) -> dict[str, Any]:
        """The row as `adqueue jobs` prints it."""
        return {"job_id": self.id, "kind": self.kind, "status": self.status, "model": self.model,
                "n_total": self.n_total, "n_done": self.n_done, "n_failed": self.n_failed,
                "created_at": self.created_at, "error": self.error}


def list_jobs(session: Session, limit: int = 20, *, counts: bool = False, job_id: int | None = None) -> list[JobRow]:
    """The latest `limit` jobs (or job `job_id`), newest first; `counts`: with their result rows
    counted (scored, flagged, errors), as their summaries keep them."""
    where = [] if job_id is None else [Job.id == job_id]
    jobs = session.execute(
        select(Job, Model.name, Model.version).outerjoin(Model, Model.id == Job.model_id)
        .where(*where).order_by(Job.id.desc()).limit(limit)
    ).all()
    ids = [job.id for job, _, _ in jobs]
    found: dict[int, tuple[int, int, int]] = {}
    if ids and counts:
        for listed, scored, flagged, errors in session.execute(
            select(JobSummary.job_id, JobSummary.n_scored, JobSummary.n_flagged, JobSummary.n_errors)
            .where(JobSummary.job_id.in_(ids))
        ):
            found[listed] = (int(scored), int(flagged), int(errors))
    rows = []
    for job, name, version in jobs:
        n_scored, n_flagged, n_errors = found.get(job.id, (0, 0, 0))
        rows.append(JobRow(
            id=job.id, kind=job.kind, status=job.status, model_id=job.model_id, model_name=name,
            model_version=version, source=job.source, n_total=job.n_total, n_done=job.n_done, n_failed=job.n_failed,
            n_skipped=job.n_skipped or 0, phase=job.phase, error=job.error, created_at=job.created_at,
            started_at=job.started_at, finished_at=job.finished_at, n_scored=n_scored, n_flagged=n_flagged,
            n_errors=n_errors, summarized=not counts or job.kind == JobKind.TRAIN or job.id in found))
    return rows


def job_results(
    session: Session, job_id: int, *, anomalous: bool = False, top: int | None = None
) -> list[dict[str, Any]]:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    if job.kind == JobKind.TRAIN:  # an empty table would read as "nothing scored"
        raise AdqueueError(f"job {job_id} is a train job: it has no per-image results; its outcome is in "
                           f"`adqueue jobs {job_id}` (status, counts, synthetic AUROC) and `adqueue models`")
    rows = _top_results(session, job_id, anomalous, top) if top else session.scalars(
        _results_of(job_id, anomalous).order_by(Result.score.desc().nulls_last(), Result.path))
    return [
        {
            "path": r.path, "score": r.score, "is_anomaly": r.is_anomaly, "heatmap_path": r.heatmap_path,
            "error": r.error, "width": r.width, "height": r.height, "sha256": r.sha256,
            "label": r.label, "defect": r.defect, "scores": r.scores,
        }
        for r in rows
    ]


def _results_of(job_id: int, anomalous: bool) -> Any:
    query = select(Result).where(Result.job_id == job_id)
    return query.where(Result.is_anomaly.is_(True)) if anomalous else query


def _top_results(session: Session, job_id: int, anomalous: bool, top: int) -> list[Result]:
    """The `top` highest scores (then rows without a score, by path), read along an index: the
    score of the top-th row first (ix_results_job_score, or ix_results_flagged), then the rows
    at or above it, ties included, sorted as the full listing sorts them."""
    scored = _results_of(job_id, anomalous).where(Result.score.is_not(None))
    cut = session.scalar(scored.with_only_columns(Result.score).order_by(Result.score.desc())
                         .offset(top - 1).limit(1))
    if cut is not None:
        scored = scored.where(Result.score >= cut)
    rows = list(session.scalars(scored.order_by(Result.score.desc(), Result.path)))[:top]
    if len(rows) < top and not anomalous:  # rows without a score: the start of ix_results_job_score
        rows += session.scalars(_results_of(job_id, anomalous).where(Result.score.is_(None))
                                .order_by(Result.path).limit(top - len(rows)))
    return rows


def _latest_metric(name: str) -> Any:
    """The model's latest metric `name`, as a scalar subquery of a query on models."""
    return (
        select(Metric.value)
        .where(Metric.model_id == Model.id, Metric.name == name)
        .order_by(Metric.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def list_models(session: Session) -> list[dict[str, Any]]:
    """Every model version with its latest image AUROC (evaluate) and its training self-check's
    AUROC on synthetic defects."""
    rows = session.execute(select(Model, _latest_metric("image_auroc"), _latest_metric("synthetic_auroc"))
                           .order_by(Model.name, Model.version)).all()
    return [
        {
            "model": f"{m.name}:{m.version}", "name": m.name, "version": m.version, "detector": m.detector,
            "backbone": m.backbone, "threshold": m.threshold, "image_auroc": auroc, "synthetic_auroc": synthetic,
            "created_at": m.created_at, "artifact_path": m.artifact_path,
            "warnings": list((m.params or {}).get("warnings") or []),
            # A memory-bank detector's (patchcore's) bank: what its model file and scoring cost grow with.
            "bank_size": ((m.params or {}).get("fit") or {}).get("bank_size"),
            "bank_mb": ((m.params or {}).get("fit") or {}).get("bank_mb"),
        }
        for m, auroc, synthetic in rows
    ]


def model_warnings(session: Session, model: str) -> list[str]:
    """What training warned about model NAME:VERSION (params["warnings"]); empty if none or no such model."""
    name, _, version = model.rpartition(":")
    if not name or not version.isdigit():
        return []
    params = session.scalar(select(Model.params).where(Model.name == name, Model.version == int(version)))
    return list((params or {}).get("warnings") or [])


def job_metrics(session: Session, job_id: int) -> dict[str, float | None]:
    rows = session.execute(select(Metric.name, Metric.value).where(Metric.job_id == job_id).order_by(Metric.id))
    return {name: value for name, value in rows}


def shard_job_id(session: Session, shard_id: int) -> int | None:
    return session.scalar(select(Shard.job_id).where(Shard.id == shard_id))


def shard_closed_by(session: Session, shard_id: int, run_id: int) -> bool:
    """Whether `run_id` is the run that closed the shard."""
    return bool(session.scalar(select(func.count()).select_from(Shard).where(
        Shard.id == shard_id, Shard.run_id == run_id, Shard.status.in_((ShardStatus.DONE, ShardStatus.FAILED)))))


def other_shard_runs(session: Session, shard_id: int, run_id: int) -> list[int]:
    """The runs of a shard other than `run_id` (earlier attempts, dead or lost)."""
    return list(session.scalars(select(Run.id).where(Run.shard_id == shard_id, Run.id != run_id)))


def unwritten_note(job: Job) -> str | None:
    """What a job's shards could not write, in words: "12 heat maps not written: No space left on device"."""
    parts = [f"{count} {what} not written" for count, what in (
        (job.n_heatmaps_unwritten, "heat map(s)"), (job.n_eval_maps_unwritten, "evaluation map(s) (pixel metrics)"))
        if count]
    if not parts:
        return None
    return "; ".join(parts) + (f": {job.unwritten_reason}" if job.unwritten_reason else "")


def job_unwritten_note(session: Session, job_id: int) -> str | None:
    job = session.get(Job, job_id)
    return unwritten_note(job) if job is not None else None


def submission_progress(session: Session, job_id: int) -> tuple[int, int, str | None]:
    """(shards written, items in them, path of the last item) of a job's submission so far."""
    n_shards, n_items = session.execute(
        select(func.count(), func.coalesce(func.sum(Shard.n_items), 0)).where(Shard.job_id == job_id)
    ).one()
    items = session.scalar(select(Shard.items).where(Shard.job_id == job_id).order_by(Shard.seq.desc()).limit(1))
    return int(n_shards), int(n_items), (str(items[-1][0]) if items else None)


def live_leases(session: Session, now: datetime) -> int:
    """How many runs anywhere hold a lease that has not expired: is any worker working?"""
    shards = session.scalar(select(func.count()).select_from(Shard).where(
        Shard.status == ShardStatus.RUNNING, Shard.lease_expires_at >= now))
    jobs = session.scalar(select(func.count()).select_from(Job).where(
        Job.status.in_(JobStatus.ACTIVE), Job.lease_expires_at >= now))
    return int(shards or 0) + int(jobs or 0)
