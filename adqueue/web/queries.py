"""The read side of the morning review (`adqueue serve`): every query its pages run.

Plain selects with the counting done in SQL (GROUP BY, CASE, window functions), a bounded number
of statements per page whatever the size of a night, and paged lists. Portable between SQLite and
PostgreSQL: no percentile_cont, no FLOOR, no string functions beyond replace and rtrim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from adqueue.store.models import (
    Job,
    JobKind,
    Metric,
    Model,
    Result,
    Review,
    ReviewVerdict,
)
from adqueue.store.queries import JobRow, count_if, list_jobs

# Trend: ranks kept per job for the drift test. The KS statistic of a systematic sample of the
# sorted scores is within about 1/TREND_SAMPLE of the full night's.
TREND_SAMPLE = 2000
QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class ModelInfo:
    id: int
    name: str
    version: int
    detector: str
    backbone: str | None
    threshold: float | None
    created_at: datetime
    params: dict[str, Any]

    @property
    def calibration_scores(self) -> list[float]:
        """The held-out scores the threshold was set on; empty for models trained before they were kept."""
        scores = ((self.params or {}).get("calibration") or {}).get("scores") or []
        return [float(s) for s in scores if isinstance(s, (int, float))]


@dataclass(frozen=True)
class Page:
    rows: list[Any]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


@dataclass(frozen=True)
class FlaggedRow:
    id: int
    path: str
    score: float | None
    heatmap_path: str | None
    width: int | None
    height: int | None
    verdict: str | None  # the latest review's
    reviewer: str | None


@dataclass(frozen=True)
class FolderRate:
    folder: str  # the directory's text form, with a trailing "/" ("" for top-level paths)
    n_rows: int
    n_scored: int
    n_flagged: int
    n_errors: int

    @property
    def anomaly_rate(self) -> float | None:
        return self.n_flagged / self.n_scored if self.n_scored else None


@dataclass(frozen=True)
class ReviewCounts:
    defect: int
    false_alarm: int

    @property
    def reviewed(self) -> int:
        return self.defect + self.false_alarm

    @property
    def precision(self) -> float | None:
        return self.defect / self.reviewed if self.reviewed else None


@dataclass(frozen=True)
class Evaluation:
    job_id: int | None
    model_id: int
    dataset: str | None
    created_at: datetime
    metrics: list[tuple[str, float | None]]


@dataclass
class TrendPoint:
    job_id: int
    model_id: int | None
    version: int
    status: str
    created_at: datetime
    threshold: float | None
    n_scored: int = 0
    n_flagged: int = 0
    n_normal: int = 0  # scores at or below the model's threshold
    quantiles: dict[int, float] = field(default_factory=dict)  # percent -> score (nearest rank)
    normal_sample: list[float] = field(default_factory=list)  # sorted

    @property
    def anomaly_rate(self) -> float | None:
        return self.n_flagged / self.n_scored if self.n_scored else None


def recent_jobs(session: Session, limit: int = 100) -> list[JobRow]:
    """The latest `limit` jobs, newest first, with their result counts."""
    return list_jobs(session, limit, counts=True)


def job(session: Session, job_id: int) -> JobRow | None:
    rows = list_jobs(session, 1, counts=True, job_id=job_id)
    return rows[0] if rows else None


def _model_info(model: Model) -> ModelInfo:
    return ModelInfo(id=model.id, name=model.name, version=model.version, detector=model.detector,
                     backbone=model.backbone, threshold=model.threshold, created_at=model.created_at,
                     params=dict(model.params or {}))


def model(session: Session, model_id: int) -> ModelInfo | None:
    row = session.get(Model, model_id)
    return _model_info(row) if row else None


def model_versions(session: Session, name: str) -> list[ModelInfo]:
    return [_model_info(m) for m in session.scalars(select(Model).where(Model.name == name).order_by(Model.version))]


def result_job(session: Session, result_id: int) -> int | None:
    return session.scalar(select(Result.job_id).where(Result.id == result_id))


def result_files(session: Session, result_id: int) -> tuple[str, str | None, str | None] | None:
    """(path, sha256, heatmap_path) of one result row: what the image routes may serve, and check."""
    row = session.execute(select(Result.path, Result.sha256, Result.heatmap_path).where(Result.id == result_id)).first()
    return (row[0], row[1], row[2]) if row else None


def score_range(session: Session, job_id: int) -> tuple[float | None, float | None]:
    low, high = session.execute(
        select(func.min(Result.score), func.max(Result.score)).where(Result.job_id == job_id)
    ).one()
    return low, high


def score_histogram(session: Session, job_id: int, edges: Sequence[float]) -> list[int]:
    """How many of the job's scores fall in each bin [edges[i], edges[i+1]) (the last bin closed)."""
    n_bins = len(edges) - 1
    if n_bins < 1:
        return []
    # A CASE ladder rather than arithmetic: FLOOR and integer casts differ between SQLite and PostgreSQL.
    # Grouped through a subquery: PostgreSQL would not see two copies of an expression with bound
    # parameters (the edges) in SELECT and GROUP BY as the same expression.
    binned = select(case(*[(Result.score < edge, index) for index, edge in enumerate(edges[1:-1])],
                         else_=n_bins - 1).label("bin")).where(
        Result.job_id == job_id, Result.score.is_not(None), Result.score >= edges[0], Result.score <= edges[-1]
    ).subquery()
    counts = [0] * n_bins
    for index, count in session.execute(select(binned.c.bin, func.count()).group_by(binned.c.bin)):
        counts[int(index)] = int(count)
    return counts


def _latest_reviews(result_filter: Any) -> Any:
    """The id of each result's latest review, for the results matching `result_filter`."""
    return (select(func.max(Review.id)).join(Result, Result.id == Review.result_id)
            .where(result_filter).group_by(Review.result_id))


def flagged_page(session: Session, job_id: int, page: int, per_page: int) -> Page:
    """The job's flagged images, worst first, with each one's latest verdict."""
    flagged = and_(Result.job_id == job_id, Result.is_anomaly.is_(True))
    total = session.scalar(select(func.count()).select_from(Result).where(flagged)) or 0
    page = _clamp(page, total, per_page)
    shown = (select(Result).where(flagged).order_by(Result.score.desc().nulls_last(), Result.id)
             .offset((page - 1) * per_page).limit(per_page)).subquery()
    latest = select(Review.result_id, Review.verdict, Review.reviewer).where(
        Review.id.in_(_latest_reviews(Result.id.in_(select(shown.c.id))))).subquery()
    rows = session.execute(
        select(shown.c.id, shown.c.path, shown.c.score, shown.c.heatmap_path, shown.c.width, shown.c.height,
               latest.c.verdict, latest.c.reviewer)
        .outerjoin(latest, latest.c.result_id == shown.c.id)
        .order_by(shown.c.score.desc().nulls_last(), shown.c.id)
    ).all()
    return Page([FlaggedRow(*row) for row in rows], int(total), page, per_page)


def error_page(session: Session, job_id: int, page: int, per_page: int) -> Page:
    """The job's result rows with an error, by path: list of (path, error)."""
    errors = and_(Result.job_id == job_id, Result.error.is_not(None))
    total = session.scalar(select(func.count()).select_from(Result).where(errors)) or 0
    page = _clamp(page, total, per_page)
    rows = session.execute(select(Result.path, Result.error).where(errors).order_by(Result.path)
                           .offset((page - 1) * per_page).limit(per_page)).all()
    return Page([tuple(row) for row in rows], int(total), page, per_page)


def _clamp(page: int, total: int, per_page: int) -> int:
    return min(max(1, page), max(1, -(-total // per_page)))


def folder_rates(session: Session, job_id: int, limit: int = 500) -> list[FolderRate]:
    """Counts per directory of the job's result paths (text forms, so "/" separates as on the OS)."""
    # rtrim(path, <every character of path but "/">) strips the file name: the directory, with its "/".
    # Grouped through a subquery, like score_histogram's bins (PostgreSQL and bound parameters).
    paths = select(func.rtrim(Result.path, func.replace(Result.path, "/", "")).label("folder"), Result.score,
                   Result.is_anomaly, Result.error).where(Result.job_id == job_id).subquery()
    rows = session.execute(
        select(paths.c.folder, func.count(), func.count(paths.c.score), count_if(paths.c.is_anomaly.is_(True)),
               count_if(paths.c.error.is_not(None)))
        .group_by(paths.c.folder).order_by(paths.c.folder).limit(limit)
    ).all()
    return [FolderRate(str(name or ""), int(n), int(scored), int(flagged), int(errors))
            for name, n, scored, flagged, errors in rows]


def review_counts(session: Session, job_id: int) -> ReviewCounts:
    """Latest verdicts on the job's flagged images: what its precision is measured from."""
    flagged = and_(Result.job_id == job_id, Result.is_anomaly.is_(True))
    counts = dict(session.execute(
        select(Review.verdict, func.count()).where(Review.id.in_(_latest_reviews(flagged))).group_by(Review.verdict)
    ).all())
    return ReviewCounts(int(counts.get(ReviewVerdict.DEFECT, 0)), int(counts.get(ReviewVerdict.FALSE_ALARM, 0)))


def evaluations(session: Session, model_ids: Sequence[int]) -> list[Evaluation]:
    """Every stored metric of these models, grouped by the evaluate job that wrote it."""
    if not model_ids:
        return []
    rows = session.execute(
        select(Metric.job_id, Metric.model_id, Metric.dataset, Metric.created_at, Metric.name, Metric.value)
        .where(Metric.model_id.in_(model_ids)).order_by(Metric.job_id, Metric.id)
    ).all()
    grouped: dict[tuple[int | None, int], Evaluation] = {}
    for job_id, model_id, dataset, created_at, name, value in rows:
        key = (job_id, model_id)
        if key not in grouped:
            grouped[key] = Evaluation(job_id, model_id, dataset, created_at, [])
        grouped[key].metrics.append((name, value))
    return list(grouped.values())


def trend(session: Session, model_name: str, source: str, limit: int = 90) -> list[TrendPoint]:
    """The latest `limit` score jobs of any version of `model_name` on `source`, oldest first, with
    anomaly rate, score quantiles and a sample of the normal scores (at or below the threshold)."""
    jobs = session.execute(
        select(Job.id, Job.model_id, Model.version, Job.status, Job.created_at, Model.threshold)
        .join(Model, Model.id == Job.model_id)
        .where(Model.name == model_name, Job.source == source, Job.kind == JobKind.SCORE)
        .order_by(Job.id.desc()).limit(limit)
    ).all()
    points = {row[0]: TrendPoint(*row) for row in reversed(jobs)}
    if not points:
        return []
    ids = list(points)
    scored = and_(Result.job_id.in_(ids), Result.score.is_not(None))
    for job_id, n_scored, n_flagged, n_normal in session.execute(
        select(Result.job_id, func.count(), count_if(Result.is_anomaly.is_(True)),
               count_if(Result.score <= Model.threshold))
        .join(Model, Model.id == Result.model_id, isouter=True).where(scored).group_by(Result.job_id)
    ):
        point = points[job_id]
        point.n_scored, point.n_flagged, point.n_normal = int(n_scored), int(n_flagged), int(n_normal)
    for job_id, rank, n, score in _ranked_sample(session, scored):
        point = points[job_id]
        for percent in QUANTILES:
            if rank == (percent * n + 99) // 100:  # nearest rank: the smallest with rank/n >= percent/100
                point.quantiles[percent] = float(score)
        if rank <= point.n_normal:  # sorted by score, so the first n_normal ranks are the normal part
            point.normal_sample.append(float(score))
    return list(points.values())


def _ranked_sample(session: Session, scored: Any) -> list[tuple[int, int, int, float]]:
    """(job_id, rank, n, score) of each job's quantile ranks and of about TREND_SAMPLE evenly spaced
    ranks, in rank order: the database sorts, only those rows travel."""
    ranked = select(
        Result.job_id, Result.score,
        func.row_number().over(partition_by=Result.job_id, order_by=(Result.score, Result.id)).label("rank"),
        func.count().over(partition_by=Result.job_id).label("n"),
    ).where(scored).subquery()
    rank, n = ranked.c.rank, ranked.c.n
    at_quantile = [and_(rank * 100 >= p * n, (rank - 1) * 100 < p * n) for p in QUANTILES]
    every_kth = (rank * TREND_SAMPLE) // n > ((rank - 1) * TREND_SAMPLE) // n  # all ranks when n <= TREND_SAMPLE
    rows = session.execute(
        select(ranked.c.job_id, rank, n, ranked.c.score).where(or_(*at_quantile, every_kth))
        .order_by(ranked.c.job_id, rank)
    ).all()
    return [(int(j), int(r), int(c), float(s)) for j, r, c, s in rows]
