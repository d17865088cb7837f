"""The Celery app: JSON only, late acks, one message at a time, no result backend.

Results live in SQL, so Celery's result backend is off. Late acknowledgement plus
reject-on-worker-lost means a shard whose worker dies goes back to the queue after the visibility
timeout, but nothing depends on that: each unit of work holds a lease in SQL, and the reconciler
(workers/reconciler.py) takes back work whose lease expired and re-sends messages the broker lost.
A redelivered message whose work is held by a live lease runs nothing.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init

from adqueue.core.config import Settings
from adqueue.workers.transport import TRANSPORT

TASK_TRAIN = "adqueue.train"
TASK_SCORE_SHARD = "adqueue.score_shard"
TASK_FINISH = "adqueue.finish_job"


def make_app(settings: Settings, *, producer: bool = False) -> Celery:
    """The worker's app, or (`producer`) one that only sends and never becomes the current app."""
    if settings.broker_url is None:
        raise ValueError("a Celery app needs a broker URL (ADQUEUE_BROKER_URL or --broker)")
    app = Celery("adqueue", broker=settings.broker_url, include=[] if producer else ["adqueue.workers.tasks"],
                 set_as_current=not producer)
    if not producer:
        # A malformed queue entry is moved aside, not an "unrecoverable error" that stops the worker.
        app.conf.broker_transport = TRANSPORT
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_default_queue=settings.queue,
        task_routes={
            TASK_TRAIN: {"queue": settings.queue},
            TASK_SCORE_SHARD: {"queue": settings.queue},
            TASK_FINISH: {"queue": settings.queue},
        },
        # Shards take seconds to minutes; a message unacked this long is handed out again.
        # Swept every few seconds (kombu's default is ~100 s), so a message is back about when its
        # timeout says; the lease in SQL decides whether it then runs anything.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                  "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 2)),
                                  "unacked_restore_throttle": 1},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=10,
        enable_utc=True,
    )
    return app


def run_worker(app: Celery, argv: list[str]) -> int:
    """Run `celery worker` in this process; its exit status (app.worker_main() drops it: a worker
    stopped by an unrecoverable error would exit 0)."""
    controllers: list[Any] = []

    def keep(sender: Any, **_: Any) -> None:
        controllers.append(sender)

    worker_init.connect(keep, weak=False)
    app.worker_main(argv)
    return int(getattr(controllers[-1], "exitcode", None) or 0) if controllers else 0
