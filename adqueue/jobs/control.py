"""A person's hand on a job: cancel it, or resume whatever of it is not done."""

from __future__ import annotations

import getpass
import socket

from adqueue.core.clock import utcnow
from adqueue.core.errors import AdqueueError, JobNotFound
from adqueue.jobs.context import Context
from adqueue.jobs.finishing import after_shard_closed
from adqueue.jobs.leases import lease_until
from adqueue.jobs.outbox import send_owed
from adqueue.jobs.ports import Dispatcher
from adqueue.jobs.submit import continue_submission, submitter
from adqueue.store import transitions
from adqueue.store.models import Job, JobKind, JobStatus
from adqueue.store.reconciler_queries import owed_of_job


def cancel_job(ctx: Context, job_id: int) -> None:
    """Queued shards never run; running ones stop at their next batch and write nothing."""
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    with ctx.store.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        if not transitions.cancel_job(session, job_id, f"cancelled by {who}"):
            raise AdqueueError(f"job {job_id} is {job.status} already: nothing to cancel")


def resume_job(ctx: Context, dispatcher: Dispatcher, job_id: int) -> None:
    """Run again whatever of a failed, cancelled or stuck job is not done; what is done stays done.

    A job whose submission never finished continues it from its last shard. Through a broker the
    work is queued for the workers; without one it runs in this process right away."""
    with ctx.store.session() as session:
        job = session.get(Job, job_id, populate_existing=True)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        if job.status == JobStatus.DONE:
            raise AdqueueError(f"job {job_id} is done: nothing to resume")
        kind, submitted = job.kind, job.submitted_at is not None
    if kind != JobKind.TRAIN and not submitted:
        with ctx.store.session() as session:
            held = transitions.claim_submission(session, job_id, submitter(), lease_until=lease_until(ctx),
                                                queue=dispatcher.queue, reopen=True)
        if held is None:
            raise AdqueueError(f"job {job_id} is still being submitted by a live process: nothing to resume")
        continue_submission(ctx, dispatcher, held)
    else:
        with ctx.store.session() as session:
            if not transitions.reopen_job(session, job_id, queue=dispatcher.queue):
                raise AdqueueError(f"job {job_id} is held by a live run: nothing to resume")
    _send_owed_of_job(ctx, dispatcher, job_id)
    dispatcher.after_submit(job_id)


def _send_owed_of_job(ctx: Context, dispatcher: Dispatcher, job_id: int) -> None:
    """Send what a reopened job is owed (its queued shards, its training), or end it if nothing is left."""
    with ctx.store.session() as session:
        owed = owed_of_job(session, job_id)
    send_owed(ctx, dispatcher, owed, utcnow())
    after_shard_closed(ctx, job_id, dispatcher)  # nothing left to run: it ends, or goes to finishing
