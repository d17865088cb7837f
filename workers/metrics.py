"""A worker's Prometheus metrics (`adqueue worker --metrics-port N`, env ADQUEUE_METRICS_PORT).

Served over HTTP by the process that runs the tasks (a solo worker: one per GPU), from its own
registry. What the tasks and the reconciler thread report here, labelled by model (NAME:VERSION)
and worker (host:pid):

    adqueue_images_scored_total       images scored (result rows with a score) of the shards it closed
    adqueue_images_failed_total       error rows (unreadable files, shards given up) of the shards it closed
    adqueue_batch_duration_seconds    one batch: decode wait, forward pass, maps
    adqueue_shard_duration_seconds    one shard run, claim to commit
    adqueue_shard_runs_total          shard runs by outcome (done, retry, failed, skipped, lost, job_failed)
    adqueue_leases_lost_total         runs (shard, train, finish) that found their lease gone and wrote nothing
    adqueue_reconciler_actions_total  what its reconciler passes did, by action
    adqueue_queue_depth               messages waiting in the broker, per queue (read at each scrape)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery.signals import worker_ready
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from sqlalchemy import select

from adqueue.jobs.context import Context
from adqueue.store.models import Job, Model, Shard

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
SHARD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)

IMAGES_SCORED = Counter("adqueue_images_scored", "Images scored (result rows with a score) of closed shards.",
                        ["model", "worker"], registry=REGISTRY)
IMAGES_FAILED = Counter("adqueue_images_failed", "Error rows (unreadable files, shards given up) of closed shards.",
                        ["model", "worker"], registry=REGISTRY)
BATCH_SECONDS = Histogram("adqueue_batch_duration_seconds", "Duration of one batch of a shard.",
                          ["model", "worker"], buckets=BATCH_BUCKETS, registry=REGISTRY)
SHARD_SECONDS = Histogram("adqueue_shard_duration_seconds", "Duration of one shard run.",
                          ["model", "worker"], buckets=SHARD_BUCKETS, registry=REGISTRY)
SHARD_RUNS = Counter("adqueue_shard_runs", "Shard runs by outcome.", ["model", "worker", "outcome"],
                     registry=REGISTRY)
LEASES_LOST = Counter("adqueue_leases_lost", "Runs that found their lease gone (cancelled, or expired and taken "
                      "over) and wrote nothing.", ["kind", "worker"], registry=REGISTRY)
RECONCILER_ACTIONS = Counter("adqueue_reconciler_actions", "What reconciler passes did.", ["action", "worker"],
                             registry=REGISTRY)
QUEUE_DEPTH = Gauge("adqueue_queue_depth", "Messages waiting in the broker.", ["queue"], registry=REGISTRY)

_models: dict[int, str] = {}


def enabled() -> bool:
    return bool(os.environ.get("ADQUEUE_METRICS_PORT"))


def serve(port: int, queue_depths: Mapping[str, Callable[[], int]]) -> None:
    """Start the HTTP endpoint (a daemon thread) and the queue-depth gauges read at each scrape."""
    for queue, count in queue_depths.items():
        QUEUE_DEPTH.labels(queue).set_function(_or_nan(count))
    start_http_server(port, registry=REGISTRY)
    log.info("metrics on http://0.0.0.0:%d/metrics", port)


def _or_nan(count: Callable[[], int]) -> Callable[[], float]:
    def read() -> float:
        try:
            return float(count())
        except Exception:  # noqa: BLE001 - a broker away is no reason for a failed scrape
            return math.nan

    return read


def shard_model(ctx: Context, shard_id: int) -> str:
    """NAME:VERSION of the model a shard is scored with (cached per model row)."""
    with ctx.store.session() as session:
        model_id = session.scalar(select(Job.model_id).join(Shard, Shard.job_id == Job.id).where(Shard.id == shard_id))
        if model_id is None:
            return ""
        if model_id not in _models:
            name, version = session.execute(select(Model.name, Model.version).where(Model.id == model_id)).one()
            _models[model_id] = f"{name}:{version}"
    return _models[model_id]


class ShardMetrics:
    """Observes one shard run: its batches as they complete, then its outcome and counts."""

    def __init__(self, ctx: Context, shard_id: int, worker: str) -> None:
        self.ctx, self.shard_id, self.worker = ctx, shard_id, worker
        self.model = shard_model(ctx, shard_id)
        self.started = self.last = time.monotonic()

    def batch(self, n: int) -> None:
        now = time.monotonic()
        BATCH_SECONDS.labels(self.model, self.worker).observe(now - self.last)
        self.last = now

    def ended(self, outcome: str) -> None:
        SHARD_RUNS.labels(self.model, self.worker, outcome).inc()
        if outcome == "skipped":
            return
        SHARD_SECONDS.labels(self.model, self.worker).observe(time.monotonic() - self.started)
        if outcome == "lost":
            LEASES_LOST.labels("shard", self.worker).inc()
        if outcome in ("done", "failed"):  # the counts this run wrote with the shard's close
            with self.ctx.store.session() as session:
                ok, failed = session.execute(select(Shard.n_ok, Shard.n_failed).where(Shard.id == self.shard_id)).one()
            IMAGES_SCORED.labels(self.model, self.worker).inc(ok or 0)
            IMAGES_FAILED.labels(self.model, self.worker).inc(failed or 0)


def job_run_ended(kind: str, outcome: str, worker: str) -> None:
    if outcome == "lost":
        LEASES_LOST.labels(kind, worker).inc()


def reconciled(actions: Mapping[str, int], worker: str) -> None:
    for action, count in actions.items():
        if count:
            RECONCILER_ACTIONS.labels(action, worker).inc(count)



@worker_ready.connect
def _serve_when_ready(**_: Any) -> None:
    """The solo worker runs its tasks in this very process: serve its metrics from here."""
    port = os.environ.get("ADQUEUE_METRICS_PORT")
    if not port:
        return
    from adqueue.workers.producer import CeleryDispatcher
    from adqueue.workers.runtime import current_runtime

    settings = current_runtime().settings
    queues = [q for q in os.environ.get("ADQUEUE_WORKER_QUEUES", "").split(",") if q] or [settings.queue]
    serve(int(port), {queue: CeleryDispatcher(settings, queue).message_count for queue in queues})
