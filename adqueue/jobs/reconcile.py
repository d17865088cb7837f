"""The reconciler: what crashes, restarts and lost messages leave behind, healed from SQL.

One pass, in order:
1. Shards whose lease expired (their worker died or hung) go back to the queue, or fail with an
   error row per image once they used up `max_attempts`. A job run by a process that died
   (embedded, no broker) stops as failed, with the `adqueue resume` command that completes it.
2. Trainings and finishings whose lease expired are queued again or, after `max_attempts` runs,
   failed. A submission whose submitter died is continued from the last shard it wrote.
3. Jobs whose shards are all closed move on: a score job ends, an evaluate job is sent to its
   finishing step.
4. Score and evaluate jobs without a summary (written by an older version, or rows loaded in
   bulk) get one built from their rows (store/summaries.py), one job per transaction.
5. The SQL rows are the outbox. Work never sent is sent. Work sent a while ago that is still
   waiting is compared with the broker: if the queue holds fewer messages than SQL has waiting
   work (Redis restarted without persistence, say), the queue is read and what is missing is sent
   again. Shards simply waiting behind others keep their one message.

Every change is a guarded statement, so all workers run this at the same time safely; it runs
every `reconcile_interval_s` in each worker and on demand as `adqueue reconcile`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import cast

from adqueue.core.clock import utcnow
from adqueue.jobs.context import Context
from adqueue.jobs.finishing import after_shard_closed
from adqueue.jobs.leases import lease_until
from adqueue.jobs.outbox import send_owed
from adqueue.jobs.ports import Dispatcher, Outbox
from adqueue.jobs.submit import continue_submission
from adqueue.store import reconciler_queries as queries
from adqueue.store import summaries
from adqueue.store.models import JobKind, JobStatus
from adqueue.store.session import Store
from adqueue.store.transitions import (
    Closing,
    claim_submission,
    close_if_complete,
    fail_expired_job,
    give_up_shard,
    requeue_expired_job,
    requeue_expired_shard,
    stop_expired_embedded_job,
    stop_idle_embedded_job,
)

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    shards_requeued: int = 0
    shards_given_up: int = 0
    runs_requeued: int = 0  # trainings and finishings whose lease expired
    jobs_failed: int = 0
    jobs_ended: int = 0
    finishes_sent: int = 0
    submissions_continued: int = 0
    embedded_stopped: int = 0
    messages_sent: int = 0
    messages_resent: int = 0
    summaries_built: int = 0
    dead_letters: int = 0  # malformed queue entries workers moved aside (`<queue>.dead`): a state, not a change

    def changed(self) -> bool:
        return any(value for name, value in self.as_dict().items() if name != "dead_letters")

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        done = [f"{value} {name.replace('_', ' ')}" for name, value in self.as_dict().items() if value]
        return ", ".join(done) or "nothing to do"


def reconcile(
    ctx: Context, dispatchers: Mapping[str | None, Dispatcher], *, worker: str, now: datetime | None = None,
) -> ReconcileReport:
    """One pass. `dispatchers` maps the queues this caller can send to (None: this process); the
    dispatcher of a queue is an Outbox."""
    now = now or utcnow()
    report = ReconcileReport()
    _expired_shards(ctx, now, report)
    _expired_jobs(ctx, dispatchers, worker, now, report)
    _complete_jobs(ctx, dispatchers, report)
    report.summaries_built += build_missing_summaries(ctx.store)
    for queue, dispatcher in dispatchers.items():
        if queue is not None:
            _outbox(ctx, queue, cast(Outbox, dispatcher), now, report)  # a queue's dispatcher reads it back too
    if report.changed():
        log.info("reconciler: %s", report.describe())
    return report


def _stop_embedded(ctx: Context, job_id: int, now: datetime, *, idle: bool = False) -> bool:
    error = (f"the process running it stopped without ending it ({'no progress' if idle else 'its lease expired'}); "
             f"`adqueue resume {job_id}` completes it")
    with ctx.store.session() as session:
        if idle:
            return stop_idle_embedded_job(session, job_id, error, now - timedelta(seconds=ctx.settings.lease_s))
        return stop_expired_embedded_job(session, job_id, error, now)


def _expired_shards(ctx: Context, now: datetime, report: ReconcileReport) -> None:
    with ctx.store.session() as session:
        expired = queries.expired_shard_leases(session, now)
        idle = queries.idle_embedded_jobs(session, now - timedelta(seconds=ctx.settings.lease_s))
    for job_id in idle:
        report.embedded_stopped += _stop_embedded(ctx, job_id, now, idle=True)
    for shard_id, run_id, job_id, attempts, worker, queue, items, model_id in expired:
        if queue is None:
            report.embedded_stopped += _stop_embedded(ctx, job_id, now)
            continue
        with ctx.store.session() as session:
            if attempts >= ctx.settings.max_attempts:
                error = f"the worker running it was lost on each of {attempts} attempt(s) (last: {worker})"
                report.shards_given_up += give_up_shard(session, shard_id, run_id, error, model_id=model_id,
                                                        items=items, only_if_expired=True, now=now)
            else:
                report.shards_requeued += requeue_expired_shard(session, shard_id, run_id, now)


def _expired_jobs(ctx: Context, dispatchers: Mapping[str | None, Dispatcher], worker: str, now: datetime,
                  report: ReconcileReport) -> None:
    with ctx.store.session() as session:
        expired = queries.expired_job_leases(session, now)
    for job_id, run_id, kind, status, attempts, queue in expired:
        if queue is None:
            report.embedded_stopped += _stop_embedded(ctx, job_id, now)
        elif status == JobStatus.SUBMITTING:
            if queue not in dispatchers:
                continue  # needs a dispatcher for its queue: a worker of that queue will take it
            with ctx.store.session() as session:
                held = claim_submission(session, job_id, worker, lease_until=lease_until(ctx), queue=queue,
                                        reopen=False, now=now)
            if held is not None:
                log.warning("job %s: its submitter stopped; continuing its submission", job_id)
                continue_submission(ctx, dispatchers[queue], held)
                report.submissions_continued += 1
        elif attempts >= ctx.settings.max_attempts:
            what = "training" if kind == JobKind.TRAIN else "finishing"
            error = f"the worker running its {what} was lost on each of {attempts} attempt(s)"
            with ctx.store.session() as session:
                report.jobs_failed += fail_expired_job(session, job_id, error, now)
        else:
            with ctx.store.session() as session:
                report.runs_requeued += requeue_expired_job(session, job_id, run_id, now)


def _complete_jobs(ctx: Context, dispatchers: Mapping[str | None, Dispatcher], report: ReconcileReport) -> None:
    with ctx.store.session() as session:
        complete = queries.complete_jobs(session)
    for job_id, kind, queue in complete:
        if kind == JobKind.SCORE:
            with ctx.store.session() as session:
                report.jobs_ended += close_if_complete(session, job_id) is not None
        elif queue in dispatchers:  # an evaluate job's finishing goes to its own queue (or process)
            report.finishes_sent += after_shard_closed(ctx, job_id, dispatchers[queue]) is Closing.FINISH


def build_missing_summaries(store: Store) -> int:
    """Build the summary of every score and evaluate job that has none; how many were built."""
    with store.session() as session:
        missing = summaries.missing(session)
    built = 0
    for job_id in missing:
        with store.session() as session:
            built += summaries.build(session, job_id)
        log.info("job %s: summary built from its rows", job_id)
    return built


def _outbox(ctx: Context, queue: str, outbox: Outbox, now: datetime, report: ReconcileReport) -> None:
    report.dead_letters += outbox.dead_letters()
    # Never sent (requeued by step 1 or 2, or by resume): send now.
    with ctx.store.session() as session:
        owed = queries.owed_messages(session, queue, now, cutoff=None)
    report.messages_sent += send_owed(ctx, outbox, owed, now, sent_before=None)
    # Sent a while ago and still waiting: resend only what the broker does not hold. Counting
    # first keeps the usual pass (a long queue, nothing lost) to two counts.
    with ctx.store.session() as session:
        expected = queries.queued_work(session, queue, now)
    if not expected or outbox.message_count() >= expected:
        return  # every waiting piece of work can still have its message
    cutoff = now - timedelta(seconds=2 * ctx.settings.reconcile_interval_s)
    with ctx.store.session() as session:
        owed = queries.owed_messages(session, queue, now, cutoff=cutoff)
    present = outbox.message_ids()
    owed.shards = [i for i in owed.shards if i not in present.get("shard", set())]
    owed.trains = [i for i in owed.trains if i not in present.get("train", set())]
    owed.finishes = [i for i in owed.finishes if i not in present.get("finish", set())]
    resent = send_owed(ctx, outbox, owed, now, sent_before=cutoff)
    if resent:
        log.warning("queue %s: %d message(s) were lost from the broker; sent again", queue, resent)
    report.messages_resent += resent
