"""The reads that make each kind of job page say what it is about, and the page of one result.

Small, bounded selects beside web/queries.py: a job's settings and metrics, the labels of the
cards on one page, one result row, a model's warnings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adqueue.store.models import Job, Metric, Model, Result


def job_params(session: Session, job_id: int) -> dict[str, Any]:
    return dict(session.scalar(select(Job.params).where(Job.id == job_id)) or {})


def job_metrics(session: Session, job_id: int) -> list[tuple[str, float | None]]:
    """The metrics a job stored (an evaluation's AUROCs, a training's self-check), in the order written."""
    return [(name, value) for name, value in
            session.execute(select(Metric.name, Metric.value).where(Metric.job_id == job_id).order_by(Metric.id))]


def card_labels(session: Session, result_ids: Sequence[int]) -> dict[int, tuple[int | None, str | None]]:
    """(label, defect) of the results shown on one page of cards (an evaluation's ground truth)."""
    if not result_ids:
        return {}
    rows = session.execute(select(Result.id, Result.label, Result.defect).where(Result.id.in_(list(result_ids))))
    return {result_id: (label, defect) for result_id, label, defect in rows}


def model_warnings(session: Session, model_id: int) -> list[str]:
    params = session.scalar(select(Model.params).where(Model.id == model_id))
    return [str(w) for w in (params or {}).get("warnings") or []]


@dataclass(frozen=True)
class ResultDetail:
    id: int
    job_id: int
    path: str
    score: float | None
    is_anomaly: bool | None
    heatmap_path: str | None
    error: str | None
    width: int | None
    height: int | None
    label: int | None
    defect: str | None
    scores: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def result_detail(session: Session, result_id: int) -> ResultDetail | None:
    row = session.execute(
        select(Result.id, Result.job_id, Result.path, Result.score, Result.is_anomaly, Result.heatmap_path,
               Result.error, Result.width, Result.height, Result.label, Result.defect, Result.scores)
        .where(Result.id == result_id)
    ).first()
    return ResultDetail(**row._asdict()) if row else None
