"""The read side for the CLI: job summaries, results, models, metrics, and read-only SQL."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from adqueue.errors import AdqueueError, JobNotFound, ReadOnlyViolation
from adqueue.store.models import Job, JobKind, JobStatus, Metric, Model, Result, Shard, ShardStatus
from adqueue.store.session import make_engine

_READ_VERBS = ("select", "with", "explain", "values", "show", "table")


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
        "phase": job.phase,
        "shards": sum(shard_counts.values()),
        "shards_queued": shard_counts.get("queued", 0),
        "shards_running": shard_counts.get("running", 0),
        "shards_done": shard_counts.get("done", 0),
        "shards_failed": shard_counts.get("failed", 0),
        "shards_cancelled": shard_counts.get("cancelled", 0),
        "attempts": job.attempts,
        "queue": job.queue,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": job.error,
    }


def list_jobs(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Job, Model.name, Model.version)
        .outerjoin(Model, Model.id == Job.model_id)
        .order_by(Job.id.desc())
        .limit(limit)
    ).all()
    return [
        {
            "job_id": job.id, "kind": job.kind, "status": job.status,
            "model": f"{name}:{version}" if name else None,
            "n_total": job.n_total, "n_done": job.n_done, "n_failed": job.n_failed,
            "created_at": job.created_at, "error": job.error,
        }
        for job, name, version in rows
    ]


def job_results(
    session: Session, job_id: int, *, anomalous: bool = False, top: int | None = None
) -> list[dict[str, Any]]:
    if session.get(Job, job_id) is None:
        raise JobNotFound(f"no job {job_id}")
    query = select(Result).where(Result.job_id == job_id)
    if anomalous:
        query = query.where(Result.is_anomaly.is_(True))
    query = query.order_by(Result.score.desc().nulls_last(), Result.path)
    if top:
        query = query.limit(top)
    return [
        {
            "path": r.path, "score": r.score, "is_anomaly": r.is_anomaly, "heatmap_path": r.heatmap_path,
            "error": r.error, "width": r.width, "height": r.height, "sha256": r.sha256,
            "label": r.label, "defect": r.defect, "scores": r.scores,
        }
        for r in session.scalars(query)
    ]


def list_models(session: Session) -> list[dict[str, Any]]:
    latest_auroc = (
        select(Metric.value)
        .where(Metric.model_id == Model.id, Metric.name == "image_auroc")
        .order_by(Metric.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = session.execute(select(Model, latest_auroc).order_by(Model.name, Model.version)).all()
    return [
        {
            "model": f"{m.name}:{m.version}", "name": m.name, "version": m.version, "detector": m.detector,
            "backbone": m.backbone, "threshold": m.threshold, "image_auroc": auroc,
            "created_at": m.created_at, "artifact_path": m.artifact_path,
        }
        for m, auroc in rows
    ]


def job_metrics(session: Session, job_id: int) -> dict[str, float | None]:
    rows = session.execute(select(Metric.name, Metric.value).where(Metric.job_id == job_id).order_by(Metric.id))
    return {name: value for name, value in rows}


def shard_job_id(session: Session, shard_id: int) -> int | None:
    return session.scalar(select(Shard.job_id).where(Shard.id == shard_id))


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


# --- for the reconciler ----------------------------------------------------------------------


def _sent_before(column: Any, cutoff: datetime | None) -> Any:
    return column.is_(None) if cutoff is None else or_(column.is_(None), column < cutoff)


def _awaiting_finish() -> Any:
    """Evaluate jobs due a finishing run: complete, or finishing with no run holding them."""
    complete = and_(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)), Job.submitted_at.is_not(None),
                    ~exists().where(Shard.job_id == Job.id, Shard.status.in_(ShardStatus.OPEN)))
    orphaned = and_(Job.status == JobStatus.FINISHING, Job.run_id.is_(None))
    return and_(Job.kind == JobKind.EVALUATE, or_(complete, orphaned))


@dataclass
class Owed:
    """Work whose message is owed: never sent (or sent before a cutoff and maybe lost)."""

    shards: list[int] = field(default_factory=list)
    trains: list[int] = field(default_factory=list)
    finishes: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.shards) + len(self.trains) + len(self.finishes)


def _queued_shards(now: datetime) -> Any:
    """Queued shards of jobs that run, excluding a live submission's (its submitter sends them)."""
    live_submission = and_(Job.status == JobStatus.SUBMITTING, Job.lease_expires_at >= now)
    return and_(Shard.status == ShardStatus.QUEUED, Job.id == Shard.job_id,
                Job.status.in_(JobStatus.ACTIVE), ~live_submission)


def owed_messages(session: Session, queue: str, now: datetime, cutoff: datetime | None, limit: int = 100_000) -> Owed:
    """What the broker should hold for `queue`: queued shards, queued trainings and finishings
    whose message was never sent, or (with `cutoff`) last sent before it."""
    mine = Job.queue == queue
    shards = session.scalars(
        select(Shard.id).join(Job, Job.id == Shard.job_id)
        .where(_queued_shards(now), mine, _sent_before(Shard.enqueued_at, cutoff)).order_by(Shard.id).limit(limit))
    trains = session.scalars(select(Job.id).where(
        mine, Job.kind == JobKind.TRAIN, Job.status == JobStatus.QUEUED, _sent_before(Job.enqueued_at, cutoff)))
    finishes = session.scalars(select(Job.id).where(mine, _awaiting_finish(), _sent_before(Job.enqueued_at, cutoff)))
    return Owed(list(shards), list(trains), list(finishes))


def queued_work(session: Session, queue: str, now: datetime) -> int:
    """How many messages the broker should hold for `queue`: everything waiting, sent or not."""
    shards = session.scalar(select(func.count()).select_from(Shard).join(Job, Job.id == Shard.job_id)
                            .where(_queued_shards(now), Job.queue == queue))
    jobs = session.scalar(select(func.count()).select_from(Job).where(Job.queue == queue, or_(
        and_(Job.kind == JobKind.TRAIN, Job.status == JobStatus.QUEUED), _awaiting_finish())))
    return int(shards or 0) + int(jobs or 0)


def owed_of_job(session: Session, job_id: int) -> Owed:
    """The messages one reopened job is owed right now: its queued shards, its training."""
    owed = Owed(list(session.scalars(select(Shard.id).where(
        Shard.job_id == job_id, Shard.status == ShardStatus.QUEUED, Shard.enqueued_at.is_(None)).order_by(Shard.seq))))
    owed.trains = list(session.scalars(select(Job.id).where(
        Job.id == job_id, Job.kind == JobKind.TRAIN, Job.status == JobStatus.QUEUED, Job.enqueued_at.is_(None))))
    return owed


def expired_shard_leases(session: Session, now: datetime, limit: int = 1000) -> list[Any]:
    """Running shards whose run stopped renewing: (shard id, run id, job id, attempts, worker,
    the job's queue (None: embedded), the shard's items, the job's model id)."""
    return list(session.execute(
        select(Shard.id, Shard.run_id, Shard.job_id, Shard.attempts, Shard.worker, Job.queue, Shard.items,
               Job.model_id)
        .join(Job, Job.id == Shard.job_id)
        .where(Shard.status == ShardStatus.RUNNING, Shard.lease_expires_at < now).limit(limit)
    ).all())


def expired_job_leases(session: Session, now: datetime) -> list[Any]:
    """Trainings, finishings and submissions whose run stopped renewing its lease."""
    return list(session.execute(
        select(Job.id, Job.run_id, Job.kind, Job.status, Job.attempts, Job.queue)
        .where(Job.status.in_((JobStatus.RUNNING, JobStatus.FINISHING, JobStatus.SUBMITTING)),
               Job.lease_expires_at < now)
    ).all())


def idle_embedded_jobs(session: Session, idle_before: datetime) -> list[int]:
    """Jobs run by a submitting process (no queue) with nothing running and nothing done since
    `idle_before`: that process died between two pieces of work, holding no lease."""
    from adqueue.store.writes import last_activity

    running = exists().where(Shard.job_id == Job.id, Shard.status == ShardStatus.RUNNING)
    return list(session.scalars(select(Job.id).where(
        Job.queue.is_(None), Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)), Job.lease_expires_at.is_(None),
        ~running, last_activity() < idle_before)))


def complete_jobs(session: Session, limit: int = 1000) -> list[Any]:
    """(id, kind, queue) of score and evaluate jobs whose shards are all closed but that have not
    moved on (their last shard's worker died before ending the job)."""
    no_open = ~exists().where(Shard.job_id == Job.id, Shard.status.in_(ShardStatus.OPEN))
    return list(session.execute(select(Job.id, Job.kind, Job.queue).where(
        Job.kind.in_((JobKind.SCORE, JobKind.EVALUATE)), Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
        Job.submitted_at.is_not(None), no_open, or_(Job.kind == JobKind.SCORE, Job.enqueued_at.is_(None)),
    ).limit(limit)).all())


def check_read_only(statement: str) -> str:
    """One statement that starts with a read verb; the database enforces read-only as well."""
    body = _strip_comments(statement).strip().rstrip(";").strip()
    if not body:
        raise ReadOnlyViolation("empty SQL statement")
    if ";" in body:
        raise ReadOnlyViolation("adqueue sql is read-only and runs one statement at a time")
    verb = body.split(None, 1)[0].lower()
    if verb not in _READ_VERBS:
        raise ReadOnlyViolation(f"adqueue sql is read-only: {verb.upper()} statements are refused")
    return body


def _strip_comments(statement: str) -> str:
    statement = re.sub(r"/\*.*?\*/", " ", statement, flags=re.S)
    return re.sub(r"--[^\n]*", " ", statement)


def run_read_only(url: str, statement: str, *, max_rows: int | None = None) -> tuple[list[str], list[tuple]]:
    """Run `statement` on a read-only connection; writes fail in the database itself too."""
    body = check_read_only(statement)
    engine = make_engine(url, read_only=True)
    try:
        with engine.connect() as connection:
            # Raw driver SQL: no bind-parameter parsing of colons or percent signs in literals.
            result = connection.exec_driver_sql(body, execution_options={"no_parameters": True})
            columns = list(result.keys())
            rows = result.fetchmany(max_rows) if max_rows else result.fetchall()
            connection.rollback()
        return columns, [tuple(row) for row in rows]
    except DBAPIError as exc:
        message = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if "read-only" in message or "readonly" in message or "query_only" in message:
            raise ReadOnlyViolation(f"adqueue sql is read-only: {message}") from None
        raise AdqueueError(f"SQL error: {message}") from None
    finally:
        engine.dispose()
