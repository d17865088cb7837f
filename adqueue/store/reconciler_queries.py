"""What the reconciler reads: expired leases, idle embedded jobs, complete jobs, owed messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session

from adqueue.store.models import Job, JobKind, JobStatus, Shard, ShardStatus
from adqueue.store.transitions import last_activity, owed


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
        .where(_queued_shards(now), mine, owed(Shard.enqueued_at, cutoff)).order_by(Shard.id).limit(limit))
    trains = session.scalars(select(Job.id).where(
        mine, Job.kind == JobKind.TRAIN, Job.status == JobStatus.QUEUED, owed(Job.enqueued_at, cutoff)))
    finishes = session.scalars(select(Job.id).where(mine, _awaiting_finish(), owed(Job.enqueued_at, cutoff)))
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
