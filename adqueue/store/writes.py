"""The write side of the job lifecycle, as single guarded SQL statements.

Every transition is a conditional UPDATE whose row count says whether this caller won it, so two
workers handed the same shard (a redelivery after a lost ack) can never count it twice, and of
several workers finishing the last shards exactly one finishes the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, exists, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from adqueue.store.models import Job, JobStatus, Result, Shard, ShardStatus, utcnow

# Columns an upsert refreshes when a (job_id, path) row already exists.
_RESULT_UPDATE_COLUMNS = (
    "model_id", "shard_id", "sha256", "score", "is_anomaly", "heatmap_path", "error",
    "width", "height", "label", "defect", "scores", "scored_at",
)


@dataclass(frozen=True)
class ClaimedShard:
    shard_id: int
    job_id: int
    seq: int
    attempts: int
    items: list[Any]
    job_kind: str
    model_id: int | None
    job_params: dict[str, Any]


def claim_shard(session: Session, shard_id: int, worker: str) -> ClaimedShard | None:
    """Mark a queued (or abandoned running) shard as ours and count the attempt; None if it ended."""
    won = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status.in_(ShardStatus.OPEN))
        .values(
            status=ShardStatus.RUNNING,
            attempts=Shard.attempts + 1,
            worker=worker,
            started_at=utcnow(),
        )
    ).rowcount
    if not won:
        return None
    shard = session.get_one(Shard, shard_id, populate_existing=True)
    job = session.get_one(Job, shard.job_id, populate_existing=True)
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=func.coalesce(Job.started_at, utcnow()))
    )
    return ClaimedShard(
        shard_id=shard.id,
        job_id=job.id,
        seq=shard.seq,
        attempts=shard.attempts,
        items=list(shard.items),
        job_kind=job.kind,
        model_id=job.model_id,
        job_params=dict(job.params or {}),
    )


def upsert_results(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """One bulk INSERT ... ON CONFLICT (job_id, path) DO UPDATE for a whole shard."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        statement = postgresql.insert(Result)
    elif dialect == "sqlite":
        statement = sqlite.insert(Result)
    else:  # pragma: no cover - guarded by Settings.validate
        raise RuntimeError(f"unsupported dialect {dialect}")
    statement = statement.on_conflict_do_update(
        index_elements=[Result.job_id, Result.path],
        set_={column: statement.excluded[column] for column in _RESULT_UPDATE_COLUMNS},
    )
    session.execute(statement, list(rows))


def complete_shard(
    session: Session, claimed: ClaimedShard, *, n_ok: int, n_failed: int, status: str = ShardStatus.DONE,
    error: str | None = None,
) -> bool:
    """Close the shard and add its counts to the job, once. False if another run closed it first."""
    won = session.execute(
        update(Shard)
        .where(Shard.id == claimed.shard_id, Shard.status == ShardStatus.RUNNING)
        .values(status=status, finished_at=utcnow(), error=error)
    ).rowcount
    if not won:
        return False
    session.execute(
        update(Job)
        .where(Job.id == claimed.job_id)
        .values(n_done=Job.n_done + n_ok, n_failed=Job.n_failed + n_failed, heartbeat_at=utcnow())
    )
    return True


def release_shard(session: Session, shard_id: int, error: str) -> None:
    """Put a shard back in the queue after a failed attempt that will be retried."""
    session.execute(
        update(Shard)
        .where(Shard.id == shard_id, Shard.status == ShardStatus.RUNNING)
        .values(status=ShardStatus.QUEUED, error=error)
    )


def claim_job_finish(session: Session, job_id: int) -> str | None:
    """If no shard is open any more, move the job on; returns the status this call set, or None.

    Score jobs end here (done, or failed if a shard failed). Evaluate jobs go to `finishing`: the
    winner computes the metrics and ends the job afterwards.
    """
    open_shards = exists().where(Shard.job_id == job_id, Shard.status.in_(ShardStatus.OPEN))
    failed_shards = exists().where(Shard.job_id == job_id, Shard.status == ShardStatus.FAILED)
    job_kind = session.scalar(select(Job.kind).where(Job.id == job_id))
    if job_kind == "evaluate":
        new_status: Any = JobStatus.FINISHING
    else:
        new_status = case((failed_shards, JobStatus.FAILED), else_=JobStatus.DONE)
    won = session.execute(
        update(Job)
        .where(
            and_(Job.id == job_id, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)), ~open_shards)
        )
        .values(status=new_status, finished_at=utcnow())
    ).rowcount
    if not won:
        return None
    job = session.get_one(Job, job_id, populate_existing=True)
    if job.status == JobStatus.FAILED and not job.error:
        failed = session.scalar(
            select(func.count()).select_from(Shard).where(Shard.job_id == job_id, Shard.status == ShardStatus.FAILED)
        )
        job.error = f"{failed} shard(s) failed after {_max_attempts_hint(session, job_id)} attempt(s)"
    return job.status


def _max_attempts_hint(session: Session, job_id: int) -> int:
    return int(session.scalar(select(func.max(Shard.attempts)).where(Shard.job_id == job_id)) or 0)


def end_job(session: Session, job_id: int, *, status: str, error: str | None = None) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(status=status, error=error, finished_at=utcnow())
    )
