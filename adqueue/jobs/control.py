"""A person's hand on a job: cancel it, resume it, or mark it stopped for a later resume."""

from __future__ import annotations

import getpass
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from adqueue.core.errors import AdqueueError, Interrupted, JobNotFound
from adqueue.jobs.context import Context
from adqueue.jobs.leases import lease_until
from adqueue.store.models import Job, JobKind, JobStatus, RunOutcome, ShardStatus, utcnow
from adqueue.store.transitions import claim_submission, reopen_job, stop_job

if TYPE_CHECKING:
    from adqueue.jobs.ports import Dispatcher


@contextmanager
def interruptions_marked(ctx: Context, job_id: int) -> Iterator[None]:
    """A signal (Interrupted) or Ctrl-C while this process works on the job marks it for `resume`."""
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as exc:
        mark_interrupted(ctx, job_id, exc.name if isinstance(exc, Interrupted) else "SIGINT (Ctrl-C)")
        exc.job_id = job_id  # type: ignore[union-attr] - for the CLI's last line
        raise


def mark_interrupted(ctx: Context, job_id: int, signal_name: str) -> None:
    """The job stops as `failed` with the command that completes it; its open shards wait queued
    and the interrupted attempts are not counted."""
    error = f"interrupted by {signal_name}; `adqueue resume {job_id}` completes it"
    with ctx.store.session() as session:
        stop_job(session, job_id, status=JobStatus.FAILED, error=error, shards_to=ShardStatus.QUEUED,
                 outcome=RunOutcome.INTERRUPTED, attempt_counts=False)


def cancel_job(ctx: Context, job_id: int) -> None:
    """Queued shards never run; running ones stop at their next batch and write nothing."""
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    with ctx.store.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        if not stop_job(session, job_id, status=JobStatus.CANCELLED, error=f"cancelled by {who}",
                        shards_to=ShardStatus.CANCELLED, outcome=RunOutcome.CANCELLED):
            raise AdqueueError(f"job {job_id} is {job.status} already: nothing to cancel")


def resume_job(ctx: Context, dispatcher: Dispatcher, job_id: int) -> None:
    """Run again whatever of a failed, cancelled or stuck job is not done; what is done stays done.

    A job whose submission never finished continues it from its last shard. Through a broker the
    work is queued for the workers; without one it runs in this process right away."""
    from adqueue.jobs.submit import continue_submission, submitter  # submit imports this module

    with ctx.store.session() as session:
        job = session.get(Job, job_id, populate_existing=True)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        if job.status == JobStatus.DONE:
            raise AdqueueError(f"job {job_id} is done: nothing to resume")
        kind, submitted = job.kind, job.submitted_at is not None
    if kind != JobKind.TRAIN and not submitted:
        with ctx.store.session() as session:
            held = claim_submission(session, job_id, submitter(), lease_until=lease_until(ctx),
                                    queue=dispatcher.queue, reopen=True)
        if held is None:
            raise AdqueueError(f"job {job_id} is still being submitted by a live process: nothing to resume")
        continue_submission(ctx, dispatcher, held)
    else:
        with ctx.store.session() as session:
            if not reopen_job(session, job_id, queue=dispatcher.queue):
                raise AdqueueError(f"job {job_id} is held by a live run: nothing to resume")
    send_owed_of_job(ctx, dispatcher, job_id)
    dispatcher.after_submit(job_id)


def send_owed_of_job(ctx: Context, dispatcher: Dispatcher, job_id: int) -> None:
    """Send what a reopened job is owed (its queued shards, its training), or end it if nothing is left."""
    from adqueue.jobs.finishing import after_shard_closed
    from adqueue.jobs.reconcile import send_owed
    from adqueue.store.reconciler_queries import owed_of_job

    with ctx.store.session() as session:
        owed = owed_of_job(session, job_id)
    send_owed(ctx, dispatcher, owed, utcnow())
    after_shard_closed(ctx, job_id, dispatcher)  # nothing left to run: it ends, or goes to finishing
