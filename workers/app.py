"""The Celery app: JSON only, late acks, one message at a time, no result backend.

Results live in SQL, so Celery's result backend is off. Late acknowledgement plus
reject-on-worker-lost means a shard whose worker dies goes back to the queue; the attempt counter
in SQL (not Celery's) stops a shard that kills every worker it touches.
"""

from __future__ import annotations

from celery import Celery

from adqueue.config import Settings

TASK_TRAIN = "adqueue.train"
TASK_SCORE_SHARD = "adqueue.score_shard"


def make_app(settings: Settings) -> Celery:
    if settings.broker_url is None:
        raise ValueError("a Celery app needs a broker URL (ADQUEUE_BROKER_URL or --broker)")
    app = Celery("adqueue", broker=settings.broker_url, include=["workers.tasks"])
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
        },
        # Shards take seconds to minutes; a message unacked this long is handed out again.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=10,
        enable_utc=True,
    )
    return app
