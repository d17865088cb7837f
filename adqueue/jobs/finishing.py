"""What follows a shard's close: the end of a score job, or the finishing step of an evaluate job.

A score job simply ends, in the same step that notices its last shard closed. An evaluate job
has a final step of its own (adqueue/runners/finish.py), sent here as its own piece of work.
"""

from __future__ import annotations

from adqueue.jobs.context import Context
from adqueue.jobs.leases import DB_RETRY_S
from adqueue.jobs.ports import Dispatcher
from adqueue.store.transitions import Closing, close_if_complete


def after_shard_closed(ctx: Context, job_id: int, dispatcher: Dispatcher) -> Closing | None:
    """End the job if that was its last open shard (score), or send its finishing (evaluate)."""
    step = ctx.store.transaction(lambda session: close_if_complete(session, job_id), retry_s=DB_RETRY_S)
    if step is Closing.FINISH:
        dispatcher.enqueue_finish(job_id)
    return step
