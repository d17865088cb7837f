"""The notification of a job's end, as an outbox in the jobs table: owed, claimed, settled.

A job's end is owed a notification while `notified_at` is older than `finished_at` (or NULL):
a job resumed and ended again is owed one again. A sender claims one attempt with a guarded
UPDATE (`notify_after` in the past, the attempt count it read), so of several workers and
reconcilers exactly one sends each attempt; it then records which URLs took it, and settles the
end (sent to all, or given up) or sets the time of its next attempt. Not a job state: the job has
ended whatever happens here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from adqueue.store.models import Job, JobStatus, Model, Result
from adqueue.store.queries import count_if, list_jobs

# Normal scores kept for the drift statistic: a systematic sample of the sorted scores is within
# about 1/DRIFT_SAMPLE of the whole night's statistic (as on the trend page).
DRIFT_SAMPLE = 2000


def _owed() -> Any:
    return and_(Job.status.in_(JobStatus.ENDED), Job.finished_at.is_not(None),
                or_(Job.notified_at.is_(None), Job.notified_at < Job.finished_at))


def owed_notifications(session: Session, now: datetime, limit: int = 100) -> list[int]:
    """Ended jobs whose end is owed a notification and due an attempt now, oldest first."""
    due = or_(Job.notify_after.is_(None), Job.notify_after <= now)
    return list(session.scalars(select(Job.id).where(_owed(), due).order_by(Job.finished_at).limit(limit)))


def next_notification_due(session: Session) -> datetime | None:
    """When the next attempt of an owed notification falls due (None: none is owed)."""
    return session.scalar(select(func.min(func.coalesce(Job.notify_after, Job.finished_at))).where(_owed()))


@dataclass(frozen=True)
class ClaimedNotification:
    job_id: int
    attempt: int  # 1 for the first attempt at this end
    notification: dict[str, Any]  # {"payload": ..., "sent": [url, ...]} from earlier attempts


def claim_notification(session: Session, job_id: int, now: datetime, hold_until: datetime) -> ClaimedNotification | None:
    """Take the next attempt at a job end's notification; None if another sender holds it, it is
    not due yet, or it is settled."""
    attempts = session.scalar(select(Job.notify_attempts).where(Job.id == job_id))
    if attempts is None:
        return None
    due = or_(Job.notify_after.is_(None), Job.notify_after <= now)
    won = cast(CursorResult[Any], session.execute(
        update(Job).where(Job.id == job_id, _owed(), due, Job.notify_attempts == attempts)
        .values(notify_attempts=attempts + 1, notify_after=hold_until)
    )).rowcount
    if not won:
        return None
    notification = session.scalar(select(Job.notification).where(Job.id == job_id)) if attempts else None
    return ClaimedNotification(job_id, attempts + 1, dict(notification or {}))


def _held(claimed: ClaimedNotification) -> Any:
    return and_(Job.id == claimed.job_id, Job.notify_attempts == claimed.attempt, _owed())


def store_alarms(session: Session, claimed: ClaimedNotification, alarms: list[dict[str, str]],
                 drift_ks: float | None) -> None:
    """The alarms of this end, for the pages and verbs (by the sender of its first attempt)."""
    session.execute(update(Job).where(_held(claimed)).values(alarms=alarms, drift_ks=drift_ks))


def retry_notification(session: Session, claimed: ClaimedNotification, notification: dict[str, Any],
                       retry_at: datetime) -> bool:
    """Record what this attempt delivered and when the next one falls due."""
    return bool(cast(CursorResult[Any], session.execute(
        update(Job).where(_held(claimed)).values(notification=notification, notify_after=retry_at)
    )).rowcount)


def settle_notification(session: Session, claimed: ClaimedNotification, notification: dict[str, Any],
                        now: datetime) -> bool:
    """This end is told (or given up on): nothing more is owed until the job ends again."""
    return bool(cast(CursorResult[Any], session.execute(
        update(Job).where(_held(claimed))
        # Never before the end it settles, whatever the clocks of the hosts that wrote the two say.
        .values(notified_at=case((Job.finished_at > now, Job.finished_at), else_=now),
                notify_attempts=0, notify_after=None, notification=notification)
    )).rowcount)


@dataclass(frozen=True)
class JobFacts:
    """What a job's notification and alarms are made of."""

    job_id: int
    kind: str
    status: str
    error: str | None
    source: str
    model: str | None
    model_params: dict[str, Any] | None
    threshold: float | None
    n_total: int
    n_done: int
    n_failed: int
    n_scored: int
    n_flagged: int
    n_errors: int
    finished_at: datetime | None
    normal_sample: list[float]  # sorted; a systematic sample of the scores at or below the threshold
    n_normal: int


def job_facts(session: Session, job_id: int) -> JobFacts | None:
    """One job's counts and, for the drift statistic, a bounded sample of its normal scores."""
    row = session.execute(
        select(Job, Model.name, Model.version, Model.params, Model.threshold)
        .outerjoin(Model, Model.id == Job.model_id).where(Job.id == job_id)
    ).first()
    if row is None:
        return None
    job, name, version, params, threshold = row
    n_scored, n_flagged, n_errors = session.execute(
        select(func.count(Result.score), count_if(Result.is_anomaly.is_(True)), count_if(Result.error.is_not(None)))
        .where(Result.job_id == job_id)
    ).one()
    sample: list[float] = []
    n_normal = 0
    if threshold is not None and job.kind != "train":
        ranked = select(
            Result.score, func.row_number().over(order_by=(Result.score, Result.id)).label("rank"),
            func.count().over().label("n"),
        ).where(Result.job_id == job_id, Result.score.is_not(None), Result.score <= threshold).subquery()
        rank, n = ranked.c.rank, ranked.c.n
        every_kth = (rank * DRIFT_SAMPLE) // n > ((rank - 1) * DRIFT_SAMPLE) // n
        for score, total in session.execute(select(ranked.c.score, n).where(every_kth).order_by(rank)):
            sample.append(float(score))
            n_normal = int(total)
    return JobFacts(
        job_id=job.id, kind=str(job.kind), status=str(job.status), error=job.error, source=job.source,
        model=f"{name}:{version}" if name else None, model_params=dict(params) if params else None,
        threshold=threshold, n_total=job.n_total, n_done=job.n_done, n_failed=job.n_failed, n_scored=int(n_scored),
        n_flagged=int(n_flagged), n_errors=int(n_errors), finished_at=job.finished_at, normal_sample=sample,
        n_normal=n_normal)


def ended_alarms(session: Session, job_ids: list[int]) -> dict[int, list[dict[str, str]]]:
    """The stored alarms of these jobs' latest ends (jobs still running, or ended but not yet
    looked at, have none)."""
    if not job_ids:
        return {}
    rows = session.execute(select(Job.id, Job.alarms).where(
        Job.id.in_(job_ids), Job.status.in_(JobStatus.ENDED), Job.alarms.is_not(None),
        or_(Job.notified_at >= Job.finished_at, Job.notify_attempts > 0)))
    return {job_id: list(alarms or []) for job_id, alarms in rows}



def outcome_fields(session: Session, job_id: int) -> dict[str, Any]:
    """What the CLI adds to a job's counts: scored, flagged, unreadable, anomaly rate, and the
    alarms of its latest end (empty while it runs, or for a job that ended before alarms existed)."""
    rows = list_jobs(session, 1, counts=True, job_id=job_id)
    if not rows:
        return {}
    row = rows[0]
    return {"n_scored": row.n_scored, "n_flagged": row.n_flagged, "n_errors": row.n_errors,
            "anomaly_rate": row.anomaly_rate, "alarms": ended_alarms(session, [job_id]).get(job_id, [])}
