"""The read side for the CLI: job summaries, results, models, metrics, and read-only SQL."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from adqueue.errors import AdqueueError, JobNotFound, ReadOnlyViolation
from adqueue.store.models import Job, Metric, Model, Result, Shard
from adqueue.store.session import make_engine

_READ_VERBS = ("select", "with", "explain", "values", "show", "table")


def job_summary(session: Session, job_id: int) -> dict[str, Any]:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    shard_counts = dict(
        session.execute(
            select(Shard.status, func.count()).where(Shard.job_id == job_id).group_by(Shard.status)
        ).all()
    )
    model = session.get(Model, job.model_id) if job.model_id else None
    return {
        "job_id": job.id,
        "kind": job.kind,
        "status": job.status,
        "model": f"{model.name}:{model.version}" if model else None,
        "source": job.source,
        "n_total": job.n_total,
        "n_done": job.n_done,
        "n_failed": job.n_failed,
        "phase": job.phase,
        "shards": sum(shard_counts.values()),
        "shards_queued": shard_counts.get("queued", 0),
        "shards_running": shard_counts.get("running", 0),
        "shards_done": shard_counts.get("done", 0),
        "shards_failed": shard_counts.get("failed", 0),
        "attempts": job.attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": job.error,
    }


def list_jobs(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Job, Model.name, Model.version)
        .outerjoin(Model, Model.id == Job.model_id)
        .order_by(Job.id.desc())
        .limit(limit)
    ).all()
    return [
        {
            "job_id": job.id, "kind": job.kind, "status": job.status,
            "model": f"{name}:{version}" if name else None,
            "n_total": job.n_total, "n_done": job.n_done, "n_failed": job.n_failed,
            "created_at": job.created_at, "error": job.error,
        }
        for job, name, version in rows
    ]


def job_results(
    session: Session, job_id: int, *, anomalous: bool = False, top: int | None = None
) -> list[dict[str, Any]]:
    if session.get(Job, job_id) is None:
        raise JobNotFound(f"no job {job_id}")
    query = select(Result).where(Result.job_id == job_id)
    if anomalous:
        query = query.where(Result.is_anomaly.is_(True))
    query = query.order_by(Result.score.desc().nulls_last(), Result.path)
    if top:
        query = query.limit(top)
    return [
        {
            "path": r.path, "score": r.score, "is_anomaly": r.is_anomaly, "heatmap_path": r.heatmap_path,
            "error": r.error, "width": r.width, "height": r.height, "sha256": r.sha256,
            "label": r.label, "defect": r.defect, "scores": r.scores,
        }
        for r in session.scalars(query)
    ]


def list_models(session: Session) -> list[dict[str, Any]]:
    latest_auroc = (
        select(Metric.value)
        .where(Metric.model_id == Model.id, Metric.name == "image_auroc")
        .order_by(Metric.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = session.execute(select(Model, latest_auroc).order_by(Model.name, Model.version)).all()
    return [
        {
            "model": f"{m.name}:{m.version}", "name": m.name, "version": m.version, "detector": m.detector,
            "backbone": m.backbone, "threshold": m.threshold, "image_auroc": auroc,
            "created_at": m.created_at, "artifact_path": m.artifact_path,
        }
        for m, auroc in rows
    ]


def job_metrics(session: Session, job_id: int) -> dict[str, float | None]:
    rows = session.execute(select(Metric.name, Metric.value).where(Metric.job_id == job_id).order_by(Metric.id))
    return {name: value for name, value in rows}


def check_read_only(statement: str) -> str:
    """One statement that starts with a read verb; the database enforces read-only as well."""
    body = _strip_comments(statement).strip().rstrip(";").strip()
    if not body:
        raise ReadOnlyViolation("empty SQL statement")
    if ";" in body:
        raise ReadOnlyViolation("adqueue sql is read-only and runs one statement at a time")
    verb = body.split(None, 1)[0].lower()
    if verb not in _READ_VERBS:
        raise ReadOnlyViolation(f"adqueue sql is read-only: {verb.upper()} statements are refused")
    return body


def _strip_comments(statement: str) -> str:
    statement = re.sub(r"/\*.*?\*/", " ", statement, flags=re.S)
    return re.sub(r"--[^\n]*", " ", statement)


def run_read_only(url: str, statement: str, *, max_rows: int | None = None) -> tuple[list[str], list[tuple]]:
    """Run `statement` on a read-only connection; writes fail in the database itself too."""
    body = check_read_only(statement)
    engine = make_engine(url, read_only=True)
    try:
        with engine.connect() as connection:
            # Raw driver SQL: no bind-parameter parsing of colons or percent signs in literals.
            result = connection.exec_driver_sql(body, execution_options={"no_parameters": True})
            columns = list(result.keys())
            rows = result.fetchmany(max_rows) if max_rows else result.fetchall()
            connection.rollback()
        return columns, [tuple(row) for row in rows]
    except DBAPIError as exc:
        message = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if "read-only" in message or "readonly" in message or "query_only" in message:
            raise ReadOnlyViolation(f"adqueue sql is read-only: {message}") from None
        raise AdqueueError(f"SQL error: {message}") from None
    finally:
        engine.dispose()
