"""Every job and shard state change: adqueue's state machine, each step one guarded statement.

    job     submitting ─► queued ─► running ─► done | failed                  score
                                       └─────► finishing ─► done | failed     evaluate (metrics)
            train:          queued ─► running ─► done | failed
            any active state ─► cancelled (cancel) | failed (permanent error, stopped embedded run)
            failed | cancelled | stuck ─► submitting | queued | running          (resume)

    shard   queued ─► running ─► done | failed
              ▲          │  retry, lease expired, interrupted
              └──────────┘
            queued | running ─► cancelled | failed         (its job was cancelled or failed)
            failed | cancelled ─► queued                    (resume)

Leases with fencing: claiming a shard, or a job's training, finishing or submission, starts a run
(a row in `runs`) whose id goes into shards.run_id / jobs.run_id with a lease end. Renewing,
completing, releasing and giving up are UPDATEs conditional on that id, so a run that lost its
lease (it expired and was taken over, or the job was cancelled) changes nothing; a shard's result
rows are written in the same transaction as its guarded completion, so such a run writes no row.
A second delivery of a message whose shard holds a live lease claims nothing, so attempts count
runs that started, not deliveries. Every function here either wins its guard (True, a row, an
id) or changes nothing (False, None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import and_, case, delete, exists, false, func, insert, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from adqueue.core.clock import aware, utcnow
from adqueue.store.models import (
    Job,
    JobKind,
    JobStatus,
    JobSummary,
    Metric,
    Run,
    RunKind,
    RunOutcome,
    Shard,
    ShardStatus,
)
from adqueue.store.results import upsert_results
from adqueue.store.summaries import record_shard, summarize


@dataclass(frozen=True)
class ClaimedShard:
    run_id: int
    shard_id: int
    job_id: int
    seq: int
    attempts: int
    items: list[Any]
    job_kind: str
    model_id: int | None
    job_params: dict[str, Any]


@dataclass(frozen=True)
class ClaimedJob:
    """A job-level run: a training, a finishing (metrics) or a submission."""

    run_id: int
    job_id: int
    kind: str
    attempts: int


def _changed(session: Session, statement: Any) -> int:
    """How many rows a guarded UPDATE changed: whether this caller won its guard."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


# --- runs -------------------------------------------------------------------------------------


def _start_run(session: Session, kind: str, job_id: int, worker: str, now: datetime,
               shard_id: int | None = None) -> int:
    run = Run(kind=kind, job_id=job_id, shard_id=shard_id, worker=worker, outcome=RunOutcome.RUNNING,
              started_at=now)
    session.add(run)
    session.flush()
    return run.id


def end_run(session: Session, run_id: int | None, outcome: str, error: str | None = None,
            now: datetime | None = None) -> None:
    """Record how a run ended (once: a run already ended keeps its first outcome)."""
    if run_id is None:
        return
    session.execute(
        update(Run).where(Run.id == run_id, Run.outcome == RunOutcome.RUNNING)
        .values(outcome=outcome, ended_at=now or utcnow(), error=error)
    )


# --- shards -----------------------------------------------------------------------------------


def claim_shard(session: Session, shard_id: int, worker: str, *, lease_until: datetime,
                now: datetime | None = None) -> ClaimedShard | None:
    """Take a queued shard, or one whose lease expired; None if it is held, closed or gone."""
    now = now or utcnow()
    previous_run = session.scalar(select(Shard.run_id).where(Shard.id == shard_id))
    won = _changed(session,
        update(Shard)
        .where(Shard.id == shard_id, or_(
            Shard.status == ShardStatus.QUEUED,
            and_(Shard.status == ShardStatus.RUNNING, Shard.lease_expires_at < now),
        ))
        .values(status=ShardStatus.RUNNING, attempts=Shard.attempts + 1, worker=worker, started_at=now,
                lease_expires_at=lease_until)
    )
    if not won:
        return None
    end_run(session, previous_run, RunOutcome.EXPIRED, "lease expired; taken over by " + worker, now)
    shard = session.get_one(Shard, shard_id, populate_existing=True)
    run_id = _start_run(session, RunKind.SHARD, shard.job_id, worker, now, shard_id=shard_id)
    session.execute(update(Shard).where(Shard.id == shard_id).values(run_id=run_id))
    job = session.get_one(Job, shard.job_id, populate_existing=True)
    # The first claim starts the job, even one whose submission is still writing shards (it stays
    # `submitting` until then, with its start time already set).
    session.execute(
        update(Job)
        .where(Job.id == job.id, or_(Job.status == JobStatus.QUEUED, Job.started_at.is_(None)))
        .values(status=case((Job.status == JobStatus.QUEUED, JobStatus.RUNNING), else_=Job.status),
                started_at=func.coalesce(Job.started_at, now))
    )
    return ClaimedShard(run_id, shard.id, job.id, shard.seq, shard.attempts, list(shard.items), job.kind,
                        job.model_id, dict(job.params or {}))


def _held(shard_id: int, run_id: int) -> Any:
    return and_(Shard.id == shard_id, Shard.run_id == run_id, Shard.status == ShardStatus.RUNNING)


def renew_shard_lease(session: Session, shard_id: int, run_id: int, lease_until: datetime) -> bool:
    """Extend the lease; False if this run no longer holds the shard (expired, cancelled)."""
    return bool(_changed(session, update(Shard).where(_held(shard_id, run_id))
                                .values(lease_expires_at=lease_until)))


def complete_shard(
    session: Session, claimed: ClaimedShard, rows: Sequence[dict[str, Any]], *, n_ok: int, n_failed: int,
    status: str = ShardStatus.DONE, error: str | None = None, now: datetime | None = None,
) -> bool:
    """Close the shard, write its rows and add its counts to the job, only if this run holds it."""
    now = now or utcnow()
    won = _changed(session,
        update(Shard).where(_held(claimed.shard_id, claimed.run_id))
        .values(status=status, finished_at=now, error=error, lease_expires_at=None, n_ok=n_ok, n_failed=n_failed)
    )
    if not won:
        return False
    upsert_results(session, [{**row, "job_id": claimed.job_id, "shard_id": claimed.shard_id,
                              "run_id": claimed.run_id} for row in rows])
    end_run(session, claimed.run_id, RunOutcome.DONE if status == ShardStatus.DONE else RunOutcome.FAILED,
            error, now)
    _add_to_job(session, claimed.job_id, claimed.shard_id, rows, final=status == ShardStatus.DONE, now=now,
                n_done=Job.n_done + n_ok, n_failed=Job.n_failed + n_failed)
    return True


def _add_to_job(session: Session, job_id: int, shard_id: int, rows: Sequence[dict[str, Any]], *, final: bool,
                now: datetime, **counts: Any) -> None:
    """A closing shard's counts and summary onto its job: a shard close's last statements. The job
    row is every closer's: its lock is taken last, so the transaction holds it for the fewest
    statements (at 8 writers the wait for it was most of a close); the rows are summed before it."""
    summary = summarize(rows)
    session.execute(update(Job).where(Job.id == job_id).values(**counts, heartbeat_at=now))
    record_shard(session, job_id, shard_id, summary, final=final)


@dataclass(frozen=True)
class Unwritten:
    """Files a shard's run could not write (a full disk): the rows keep their scores without them."""

    heatmaps: int = 0
    eval_maps: int = 0  # images whose anomaly maps (for pixel metrics) were not saved
    reason: str | None = None

    def __bool__(self) -> bool:
        return bool(self.heatmaps or self.eval_maps)


def note_unwritten_files(session: Session, job_id: int, unwritten: Unwritten) -> None:
    """Count on the job what a shard could not write, in the transaction that completes the shard."""
    session.execute(
        update(Job).where(Job.id == job_id)
        .values(n_heatmaps_unwritten=Job.n_heatmaps_unwritten + unwritten.heatmaps,
                n_eval_maps_unwritten=Job.n_eval_maps_unwritten + unwritten.eval_maps,
                unwritten_reason=unwritten.reason)
    )


def release_shard(session: Session, claimed: ClaimedShard, error: str, *, retry_at: datetime | None,
                  counted: bool = True, now: datetime | None = None) -> bool:
    """Put the shard back in the queue for another run; `counted=False` gives the attempt back."""
    values: dict[str, Any] = {"status": ShardStatus.QUEUED, "run_id": None, "lease_expires_at": None,
                              "error": error, "enqueued_at": retry_at}
    if not counted:
        values["attempts"] = Shard.attempts - 1
    won = bool(_changed(session, update(Shard).where(_held(claimed.shard_id, claimed.run_id)).values(**values)))
    outcome = (RunOutcome.RELEASED if counted else RunOutcome.INTERRUPTED) if won else RunOutcome.LOST
    end_run(session, claimed.run_id, outcome, error, now)
    return won


def requeue_expired_shard(session: Session, shard_id: int, run_id: int, now: datetime) -> bool:
    """The reconciler takes back a shard whose run stopped renewing its lease (a dead worker)."""
    won = _changed(session,
        update(Shard)
        .where(_held(shard_id, run_id), Shard.lease_expires_at < now)
        .values(status=ShardStatus.QUEUED, run_id=None, lease_expires_at=None, enqueued_at=None,
                error="the worker running it stopped renewing its lease (lost or hung)")
    )
    if won:
        end_run(session, run_id, RunOutcome.EXPIRED, "lease expired", now)
    return bool(won)


def give_up_shard(session: Session, shard_id: int, run_id: int, error: str, *, model_id: int | None,
                  items: Sequence[Sequence[Any]], only_if_expired: bool = False, now: datetime | None = None) -> bool:
    """Fail the shard after its last attempt, with an error row per image so none goes missing."""
    now = now or utcnow()
    guard = [_held(shard_id, run_id)] + ([Shard.lease_expires_at < now] if only_if_expired else [])
    won = _changed(session,
        update(Shard).where(*guard)
        .values(status=ShardStatus.FAILED, finished_at=now, error=error, lease_expires_at=None,
                n_ok=0, n_failed=len(items))
    )
    if not won:
        return False
    job_id = session.scalar(select(Shard.job_id).where(Shard.id == shard_id))
    message = f"shard failed: {error}"
    rows = [{"job_id": job_id, "shard_id": shard_id, "run_id": run_id, "model_id": model_id, "path": path,
             "label": label, "defect": defect, "error": message, "scored_at": now}
            for path, label, defect, *_ in items]
    upsert_results(session, rows)
    end_run(session, run_id, RunOutcome.EXPIRED if only_if_expired else RunOutcome.FAILED, error, now)
    assert job_id is not None, "the shard was just updated"
    _add_to_job(session, job_id, shard_id, rows, final=False, now=now, n_failed=Job.n_failed + len(items))
    return True


def owed(column: Any, sent_before: datetime | None) -> Any:
    """Never sent, or (with `sent_before`) last sent before then and presumed lost."""
    return column.is_(None) if sent_before is None else or_(column.is_(None), column < sent_before)


def stamp_enqueued_shards(session: Session, shard_ids: Sequence[int], now: datetime,
                          sent_before: datetime | None = None) -> list[int]:
    """Record that messages are being sent for these queued shards; returns the ids this caller
    won. Only shards still owed a message are won, so of several reconcilers noticing the same
    lost message exactly one sends it again."""
    if not shard_ids:
        return []
    return list(session.scalars(
        update(Shard)
        .where(Shard.id.in_(list(shard_ids)), Shard.status == ShardStatus.QUEUED, owed(Shard.enqueued_at, sent_before))
        .values(enqueued_at=now).returning(Shard.id)
    ))


# --- submission -------------------------------------------------------------------------------


def create_job(session: Session, *, kind: str, source: str, params: dict[str, Any], model_id: int | None,
               queue: str | None, worker: str, lease_until: datetime, now: datetime | None = None) -> ClaimedJob:
    """A train job starts queued (its message follows); a sharded one starts `submitting`, held
    by the submitter's run until every shard is written."""
    now = now or utcnow()
    sharded = kind != JobKind.TRAIN
    job = Job(kind=kind, status=JobStatus.SUBMITTING if sharded else JobStatus.QUEUED, source=source,
              params=params, model_id=model_id, queue=queue, created_at=now,
              submitted_at=None if sharded else now, enqueued_at=None if sharded else now)
    session.add(job)
    session.flush()
    if not sharded:
        return ClaimedJob(0, job.id, kind, 0)
    session.add(JobSummary(job_id=job.id, updated_at=now))
    run_id = _start_run(session, RunKind.SUBMIT, job.id, worker, now)
    job.run_id, job.lease_expires_at = run_id, lease_until
    return ClaimedJob(run_id, job.id, kind, 0)


def claim_submission(session: Session, job_id: int, worker: str, *, lease_until: datetime, queue: str | None,
                     reopen: bool, now: datetime | None = None) -> ClaimedJob | None:
    """Take over an unfinished submission whose submitter died (its lease expired) or, with
    `reopen` (resume), one that was stopped, failed or cancelled."""
    now = now or utcnow()
    statuses = or_(and_(Job.status == JobStatus.SUBMITTING, Job.lease_expires_at < now),
                   Job.status.in_((JobStatus.FAILED, JobStatus.CANCELLED)) if reopen else false())
    won = _changed(session,
        update(Job).where(Job.id == job_id, Job.submitted_at.is_(None), Job.kind != JobKind.TRAIN, statuses)
        .values(status=JobStatus.SUBMITTING, lease_expires_at=lease_until, error=None, finished_at=None,
                queue=queue, attempts=Job.attempts + 1)
    )
    if not won:
        return None
    job = session.get_one(Job, job_id, populate_existing=True)
    end_run(session, job.run_id, RunOutcome.EXPIRED, "lease expired", now)
    run_id = _start_run(session, RunKind.SUBMIT, job_id, worker, now)
    job.run_id = run_id
    if reopen:  # shards a cancel or failure closed while the submission ran are open again
        _reopen_shards(session, job_id, now)
    return ClaimedJob(run_id, job_id, job.kind, job.attempts)


def add_shards(session: Session, held: ClaimedJob, first_seq: int, chunks: Sequence[Sequence[list[Any]]], *,
               lease_until: datetime, skipped: int = 0) -> list[int] | None:
    """Write the next shards of a submission (and how many files were skipped before them) and
    renew its lease; None if the lease was lost."""
    if not _renew_job(session, held, lease_until, statuses=(JobStatus.SUBMITTING,),
                      n_skipped=Job.n_skipped + skipped):
        return None
    shards = [Shard(job_id=held.job_id, seq=first_seq + offset, n_items=len(chunk), items=list(chunk))
              for offset, chunk in enumerate(chunks)]  # owed a message until stamp_enqueued_shards
    session.add_all(shards)
    session.flush()
    return [shard.id for shard in shards]


def end_submission(session: Session, held: ClaimedJob, now: datetime | None = None, skipped: int = 0) -> bool:
    """Every shard is written: the job is queued (or running, if workers already started). Its
    start is the first claim or this, whichever came first."""
    now = now or utcnow()
    started = exists().where(Shard.job_id == held.job_id, Shard.status != ShardStatus.QUEUED)
    total = select(func.coalesce(func.sum(Shard.n_items), 0)).where(Shard.job_id == held.job_id).scalar_subquery()
    won = _changed(session,
        update(Job).where(Job.id == held.job_id, Job.run_id == held.run_id, Job.status == JobStatus.SUBMITTING)
        .values(status=case((started, JobStatus.RUNNING), else_=JobStatus.QUEUED), n_total=total,
                submitted_at=now, lease_expires_at=None, attempts=0, n_skipped=Job.n_skipped + skipped,
                started_at=func.coalesce(Job.started_at, now))
    )
    if won:
        end_run(session, held.run_id, RunOutcome.DONE, now=now)
    return bool(won)


# --- job-level runs: training and finishing -----------------------------------------------------


def _claim_job(session: Session, job_id: int, kind: str, claimable: Any, status: str, worker: str,
               lease_until: datetime, now: datetime) -> ClaimedJob | None:
    previous_run = session.scalar(select(Job.run_id).where(Job.id == job_id))
    won = _changed(session,
        update(Job).where(Job.id == job_id, claimable)
        .values(status=status, attempts=Job.attempts + 1, lease_expires_at=lease_until, heartbeat_at=now,
                started_at=func.coalesce(Job.started_at, now))
    )
    if not won:
        return None
    end_run(session, previous_run, RunOutcome.EXPIRED, "lease expired; taken over by " + worker, now)
    run_id = _start_run(session, kind, job_id, worker, now)
    session.execute(update(Job).where(Job.id == job_id).values(run_id=run_id))
    job = session.get_one(Job, job_id, populate_existing=True)
    return ClaimedJob(run_id, job_id, job.kind, job.attempts)


def claim_train(session: Session, job_id: int, worker: str, *, lease_until: datetime,
                now: datetime | None = None) -> ClaimedJob | None:
    now = now or utcnow()
    claimable = and_(Job.kind == JobKind.TRAIN, or_(
        Job.status == JobStatus.QUEUED, and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)))
    return _claim_job(session, job_id, RunKind.TRAIN, claimable, JobStatus.RUNNING, worker, lease_until, now)


def _all_shards_closed(job_id: Any) -> Any:
    return ~exists().where(Shard.job_id == job_id, Shard.status.in_(ShardStatus.OPEN))


def _complete() -> Any:
    """A sharded job whose shards are all written and closed."""
    return and_(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)), Job.submitted_at.is_not(None),
                _all_shards_closed(Job.id))


def claim_finish(session: Session, job_id: int, worker: str, *, lease_until: datetime,
                 now: datetime | None = None) -> ClaimedJob | None:
    """Take an evaluate job's final step: when all its shards are closed, or a finishing run died."""
    now = now or utcnow()
    claimable = and_(Job.kind == JobKind.EVALUATE, or_(
        _complete(),
        and_(Job.status == JobStatus.FINISHING, or_(Job.run_id.is_(None), Job.lease_expires_at < now)),
    ))
    return _claim_job(session, job_id, RunKind.FINISH, claimable, JobStatus.FINISHING, worker, lease_until, now)


def _renew_job(session: Session, held: ClaimedJob, lease_until: datetime, *, statuses: tuple[str, ...],
               **values: Any) -> bool:
    return bool(_changed(session,
        update(Job).where(Job.id == held.job_id, Job.run_id == held.run_id, Job.status.in_(statuses))
        .values(lease_expires_at=lease_until, heartbeat_at=utcnow(), **values)
    ))


def renew_job_lease(session: Session, held: ClaimedJob, lease_until: datetime, **progress: Any) -> bool:
    """Extend a training's or finishing's lease (with its progress); False if it was lost."""
    return _renew_job(session, held, lease_until, statuses=(JobStatus.RUNNING, JobStatus.FINISHING), **progress)


def end_job_run(session: Session, held: ClaimedJob, *, status: str, error: str | None = None,
                now: datetime | None = None, **values: Any) -> bool:
    """End the job from the run holding it (a finished training, metrics, or their failure)."""
    now = now or utcnow()
    won = _changed(session,
        update(Job).where(Job.id == held.job_id, Job.run_id == held.run_id, Job.status.in_(JobStatus.ACTIVE))
        .values(status=status, error=error, finished_at=now, lease_expires_at=None, **values)
    )
    if won:
        end_run(session, held.run_id, RunOutcome.DONE if status == JobStatus.DONE else RunOutcome.FAILED, error, now)
    return bool(won)


def finish_with_metrics(session: Session, held: ClaimedJob, metrics: dict[str, float], *, dataset: str,
                        model_id: int, now: datetime | None = None) -> str | None:
    """End a finishing evaluate job with its metrics, replacing any an earlier run stored."""
    now = now or utcnow()
    failed = session.scalar(select(func.count()).select_from(Shard).where(
        Shard.job_id == held.job_id, Shard.status == ShardStatus.FAILED))
    status = JobStatus.FAILED if failed else JobStatus.DONE
    error = f"{failed} shard(s) failed; metrics cover the images that were scored" if failed else None
    if not end_job_run(session, held, status=status, error=error, now=now, phase=None):
        return None
    session.execute(delete(Metric).where(Metric.job_id == held.job_id))
    if metrics:
        session.execute(insert(Metric), [
            {"model_id": model_id, "job_id": held.job_id, "name": name, "value": value, "dataset": dataset,
             "created_at": now} for name, value in metrics.items()
        ])
    return status


class Closing(StrEnum):
    """What closing a job's last shard led to."""

    DONE = "done"  # a score job ended done
    FAILED = "failed"  # a score job ended failed (a shard failed)
    FINISH = "finish"  # an evaluate job is due its finishing: the one caller that won must send it


def close_if_complete(session: Session, job_id: int, now: datetime | None = None) -> Closing | None:
    """Once every shard of a sharded job is closed: a score job ends here (done, or failed if a
    shard failed); an evaluate job's finishing falls due. None: not complete, or another caller
    already moved it on."""
    now = now or utcnow()
    kind = session.scalar(select(Job.kind).where(Job.id == job_id))
    if kind == JobKind.EVALUATE:
        won = _changed(session,
            update(Job).where(Job.id == job_id, _complete(), Job.enqueued_at.is_(None)).values(enqueued_at=now)
        )
        return Closing.FINISH if won else None
    if kind != JobKind.SCORE:
        return None
    failed = exists().where(Shard.job_id == job_id, Shard.status == ShardStatus.FAILED)
    won = _changed(session,
        update(Job).where(Job.id == job_id, _complete())
        .values(status=case((failed, JobStatus.FAILED), else_=JobStatus.DONE), finished_at=now)
    )
    if not won:
        return None
    job = session.get_one(Job, job_id, populate_existing=True)
    if job.status == JobStatus.FAILED and not job.error:
        n_failed, attempts = session.execute(
            select(func.count(), func.max(Shard.attempts)).where(
                Shard.job_id == job_id, Shard.status == ShardStatus.FAILED)
        ).one()
        job.error = f"{n_failed} shard(s) failed after {attempts} attempt(s)"
    return Closing(job.status)


def requeue_expired_job(session: Session, job_id: int, run_id: int, now: datetime) -> bool:
    """The reconciler takes back a training or finishing whose run stopped renewing its lease."""
    won = _changed(session,
        update(Job)
        .where(Job.id == job_id, Job.run_id == run_id, Job.lease_expires_at < now,
               Job.status.in_((JobStatus.RUNNING, JobStatus.FINISHING)))
        .values(status=case((Job.kind == JobKind.TRAIN, JobStatus.QUEUED), else_=JobStatus.FINISHING),
                run_id=None, lease_expires_at=None, enqueued_at=None)
    )
    if won:
        end_run(session, run_id, RunOutcome.EXPIRED, "lease expired", now)
    return bool(won)


def stamp_enqueued_job(session: Session, job_id: int, now: datetime, sent_before: datetime | None = None) -> bool:
    """Like stamp_enqueued_shards, for a job's own message (its training or finishing)."""
    return bool(_changed(session,
        update(Job).where(Job.id == job_id, Job.status.in_(JobStatus.ACTIVE), owed(Job.enqueued_at, sent_before))
        .values(enqueued_at=now)
    ))


# --- stopping and reopening whole jobs ----------------------------------------------------------


def last_activity() -> Any:
    """When anything last happened to a job: a shard closed, a lease renewed, its submission."""
    return func.coalesce(Job.heartbeat_at, Job.submitted_at, Job.created_at)


@dataclass(frozen=True)
class _Stop:
    """How a job stopped from outside its runs leaves its shards and runs."""

    status: JobStatus
    shards_to: ShardStatus
    outcome: RunOutcome
    attempt_counts: bool = True  # False: the interrupted runs get their attempt back


_CANCEL = _Stop(JobStatus.CANCELLED, ShardStatus.CANCELLED, RunOutcome.CANCELLED)
_PERMANENT_ERROR = _Stop(JobStatus.FAILED, ShardStatus.FAILED, RunOutcome.FAILED)
_FAILED_SUBMISSION = _Stop(JobStatus.FAILED, ShardStatus.QUEUED, RunOutcome.FAILED)
_INTERRUPTED = _Stop(JobStatus.FAILED, ShardStatus.QUEUED, RunOutcome.INTERRUPTED, attempt_counts=False)
_ABANDONED_EMBEDDED = _Stop(JobStatus.FAILED, ShardStatus.QUEUED, RunOutcome.EXPIRED)
_LOST_EACH_TIME = _Stop(JobStatus.FAILED, ShardStatus.FAILED, RunOutcome.EXPIRED)


def cancel_job(session: Session, job_id: int, error: str, now: datetime | None = None) -> bool:
    """A person cancels an active job: open shards are cancelled and never run."""
    return _stop_job(session, job_id, _CANCEL, error, now=now)


def fail_job(session: Session, job_id: int, error: str, now: datetime | None = None) -> bool:
    """A permanent error (a missing or broken model file) fails the whole job at once."""
    return _stop_job(session, job_id, _PERMANENT_ERROR, error, now=now)


def fail_submission(session: Session, job_id: int, error: str, now: datetime | None = None) -> bool:
    """A submission that failed: the shards written so far wait queued for `resume`."""
    return _stop_job(session, job_id, _FAILED_SUBMISSION, error, now=now)


def interrupt_job(session: Session, job_id: int, error: str, now: datetime | None = None) -> bool:
    """The process running the job was told to stop (a signal, Ctrl-C): its open shards wait queued
    for `resume` and the interrupted attempts are not counted."""
    return _stop_job(session, job_id, _INTERRUPTED, error, now=now)


def stop_expired_embedded_job(session: Session, job_id: int, error: str, now: datetime) -> bool:
    """An embedded job whose process died holding a lease (it expired by `now`): failed, shards
    queued for `resume`."""
    return _stop_job(session, job_id, _ABANDONED_EMBEDDED, error, expired_before=now, now=now)


def stop_idle_embedded_job(session: Session, job_id: int, error: str, idle_before: datetime,
                           now: datetime | None = None) -> bool:
    """An embedded job whose process died between two pieces of work (no lease held): failed only
    if nothing happened to it since `idle_before` and no shard is running."""
    return _stop_job(session, job_id, _ABANDONED_EMBEDDED, error, idle_before=idle_before, now=now)


def fail_expired_job(session: Session, job_id: int, error: str, now: datetime) -> bool:
    """A training or finishing whose worker was lost on every attempt (its lease expired by `now`)."""
    return _stop_job(session, job_id, _LOST_EACH_TIME, error, expired_before=now, now=now)


def _stop_job(
    session: Session, job_id: int, stop: _Stop, error: str, *, expired_before: datetime | None = None,
    idle_before: datetime | None = None, now: datetime | None = None,
) -> bool:
    """End an active job from outside its runs, in one guarded UPDATE of the job. Runs still holding
    a lease on it lose it: they notice at their next renewal and write nothing. `expired_before`
    acts only if a lease on the job or a shard ran out by then, `idle_before` only if nothing has
    happened to the job since then and no shard is running."""
    now = now or utcnow()
    values: dict[str, Any] = {"status": stop.status, "error": error, "finished_at": now, "lease_expires_at": None}
    if not stop.attempt_counts:
        job_run_live = and_(Job.lease_expires_at.is_not(None), Job.attempts > 0)
        values["attempts"] = case((job_run_live, Job.attempts - 1), else_=Job.attempts)
    guard = [Job.id == job_id, Job.status.in_(JobStatus.ACTIVE)]
    if expired_before is not None:
        guard.append(or_(Job.lease_expires_at < expired_before, exists().where(
            Shard.job_id == job_id, Shard.status == ShardStatus.RUNNING, Shard.lease_expires_at < expired_before)))
    if idle_before is not None:
        guard.append(and_(last_activity() < idle_before, ~exists().where(
            Shard.job_id == job_id, Shard.status == ShardStatus.RUNNING)))
    won = _changed(session, update(Job).where(*guard).values(**values))
    if not won:
        return False
    open_shards = and_(Shard.job_id == job_id, Shard.status.in_(ShardStatus.OPEN))
    if not stop.attempt_counts:
        session.execute(update(Shard).where(open_shards, Shard.status == ShardStatus.RUNNING)
                        .values(attempts=Shard.attempts - 1))
    shard_values: dict[str, Any] = {"status": stop.shards_to, "run_id": None, "lease_expires_at": None}
    if stop.shards_to == ShardStatus.QUEUED:
        shard_values["enqueued_at"] = None
    else:
        shard_values.update(finished_at=now, error=error)
    session.execute(update(Shard).where(open_shards).values(**shard_values))
    session.execute(update(Run).where(Run.job_id == job_id, Run.outcome == RunOutcome.RUNNING)
                    .values(outcome=stop.outcome, ended_at=now, error=error))
    return True


def _reopen_shards(session: Session, job_id: int, now: datetime) -> None:
    """Failed and cancelled shards, and running ones whose lease expired, go back to the queue
    with a fresh attempt budget; their counts come off the job. Done shards stay done."""
    reopen = and_(Shard.job_id == job_id, or_(
        Shard.status.in_(ShardStatus.REOPENABLE),
        and_(Shard.status == ShardStatus.RUNNING, Shard.lease_expires_at < now),
    ))
    ok, failed = session.execute(
        select(func.coalesce(func.sum(Shard.n_ok), 0), func.coalesce(func.sum(Shard.n_failed), 0)).where(reopen)
    ).one()
    expired_runs = select(Shard.run_id).where(reopen, Shard.status == ShardStatus.RUNNING).scalar_subquery()
    session.execute(update(Run).where(Run.id.in_(expired_runs), Run.outcome == RunOutcome.RUNNING)
                    .values(outcome=RunOutcome.EXPIRED, ended_at=now))
    session.execute(
        update(Shard).where(reopen)
        .values(status=ShardStatus.QUEUED, attempts=0, run_id=None, lease_expires_at=None, enqueued_at=None,
                error=None, finished_at=None, n_ok=0, n_failed=0)
    )
    session.execute(update(Job).where(Job.id == job_id)
                    .values(n_done=Job.n_done - ok, n_failed=Job.n_failed - failed))


def reopen_job(session: Session, job_id: int, *, queue: str | None, now: datetime | None = None) -> bool:
    """Resume a train job, or a score/evaluate job whose shards are all written: whatever is not
    done runs again, what is done stays done. Queued shards are marked as owed a message (a stuck
    job's may have been lost); an evaluate job whose shards are all done goes back to finishing.
    False if there is nothing to reopen: done, not submitted yet, or held by a live run."""
    now = now or utcnow()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status == JobStatus.DONE:
        return False
    live = job.status in JobStatus.ACTIVE and job.lease_expires_at is not None and aware(job.lease_expires_at) > now
    if job.kind == JobKind.TRAIN:
        if live:
            return False
        end_run(session, job.run_id, RunOutcome.EXPIRED, "reopened by resume", now)
        session.execute(update(Job).where(Job.id == job_id).values(
            status=JobStatus.QUEUED, attempts=0, run_id=None, lease_expires_at=None, error=None, finished_at=None,
            enqueued_at=None, queue=queue, heartbeat_at=now))
        return True
    if job.submitted_at is None:
        return False
    _reopen_shards(session, job_id, now)
    session.execute(update(Shard).where(Shard.job_id == job_id, Shard.status == ShardStatus.QUEUED)
                    .values(enqueued_at=None))
    # Resuming is activity: without a fresh heartbeat a reconciler would take a job reopened for
    # this process (no lease yet, nothing running) for one whose process died long ago, and stop it.
    session.execute(update(Job).where(Job.id == job_id).values(queue=queue, error=None, finished_at=None,
                                                               heartbeat_at=now))
    if live:  # a finishing run is alive; it will end the job
        return True
    end_run(session, job.run_id, RunOutcome.EXPIRED, "reopened by resume", now)
    started = exists().where(Shard.job_id == job_id, Shard.status != ShardStatus.QUEUED)
    session.execute(update(Job).where(Job.id == job_id).values(
        status=case((started, JobStatus.RUNNING), else_=JobStatus.QUEUED), run_id=None, lease_expires_at=None,
        enqueued_at=None, attempts=0))
    return True

