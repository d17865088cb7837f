"""`adqueue serve`'s /metrics: the jobs, as Prometheus reads them, from SQL at each scrape.

    adqueue_jobs_active{kind, status}           jobs not yet ended
    adqueue_model_anomaly_rate{model}           flagged share of the latest ended score job of each model name
    adqueue_model_flagged{model}                its flagged images
    adqueue_model_alarms{model, alarm}          1 for each alarm that job carries (adqueue/jobs/alarms.py), else 0
    adqueue_model_last_job_timestamp_seconds{model}   when that job ended

Read from the jobs table only (a job's counts and alarms are stored with its notification when it
ends, adqueue/jobs/notify.py): a scrape costs two small queries whatever the size of a night.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from adqueue.core.clock import aware
from adqueue.jobs.alarms import KINDS
from adqueue.store.models import Job, JobKind, JobStatus, Model
from adqueue.store.session import Store


def _latest_score_jobs(session: Session) -> list[tuple[str, Any]]:
    """(model name, job) of the latest ended score job of each model name whose end was looked at."""
    looked_at = (Job.kind == JobKind.SCORE, Job.status.in_(JobStatus.ENDED), Job.notification.is_not(None),
                 Job.notified_at >= Job.finished_at)
    latest = (select(Model.name, func.max(Job.id).label("job_id")).join(Job, Job.model_id == Model.id)
              .where(*looked_at).group_by(Model.name).subquery())
    rows = session.execute(select(latest.c.name, Job).join(Job, Job.id == latest.c.job_id).order_by(latest.c.name))
    return [(name, job) for name, job in rows]


class JobsCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily("adqueue_jobs_active", "Jobs not yet ended.", labels=["kind", "status"])
        rate = GaugeMetricFamily("adqueue_model_anomaly_rate", "Flagged share of the latest ended score job of "
                                 "each model name.", labels=["model"])
        flagged = GaugeMetricFamily("adqueue_model_flagged", "Flagged images of that job.", labels=["model"])
        alarms = GaugeMetricFamily("adqueue_model_alarms", "1 for each alarm that job carries.",
                                   labels=["model", "alarm"])
        ended = GaugeMetricFamily("adqueue_model_last_job_timestamp_seconds", "When that job ended.",
                                  labels=["model"])
        with self.store.session() as session:
            counts: dict[tuple[str, str], int] = {
                (str(kind), str(status)): int(n) for kind, status, n in session.execute(
                    select(Job.kind, Job.status, func.count()).where(Job.status.in_(JobStatus.ACTIVE))
                    .group_by(Job.kind, Job.status))}
            latest = _latest_score_jobs(session)
        for job_kind in JobKind:
            for status in JobStatus.ACTIVE:
                active.add_metric([str(job_kind), str(status)], counts.get((str(job_kind), str(status)), 0))
        for name, job in latest:
            payload = (job.notification or {}).get("payload") or {}
            if payload.get("anomaly_rate") is not None:
                rate.add_metric([name], float(payload["anomaly_rate"]))
            flagged.add_metric([name], float(payload.get("n_flagged") or 0))
            raised = {alarm.get("kind") for alarm in job.alarms or []}
            for kind in KINDS:
                alarms.add_metric([name, kind], 1.0 if kind in raised else 0.0)
            if job.finished_at is not None:
                ended.add_metric([name], aware(job.finished_at).timestamp())
        yield from (active, rate, flagged, alarms, ended)


def metrics_registry(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector(store))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
