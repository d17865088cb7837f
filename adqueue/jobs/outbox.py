"""The SQL rows are the outbox: sending the messages that work waiting in SQL is owed."""

from __future__ import annotations

from datetime import datetime

from adqueue.jobs.context import Context
from adqueue.jobs.ports import Dispatcher
from adqueue.store.reconciler_queries import Owed
from adqueue.store.transitions import stamp_enqueued_job, stamp_enqueued_shards


def send_owed(ctx: Context, outbox: Dispatcher, owed: Owed, now: datetime, sent_before: datetime | None = None) -> int:
    """Stamp, then send: of several reconcilers, only the one whose stamp won sends."""
    with ctx.store.session() as session:
        shards = stamp_enqueued_shards(session, owed.shards, now, sent_before)
        trains = [i for i in owed.trains if stamp_enqueued_job(session, i, now, sent_before)]
        finishes = [i for i in owed.finishes if stamp_enqueued_job(session, i, now, sent_before)]
    outbox.enqueue_shards(shards)
    for job_id in trains:
        outbox.enqueue_train(job_id)
    for job_id in finishes:
        outbox.enqueue_finish(job_id)
    return len(shards) + len(trains) + len(finishes)
