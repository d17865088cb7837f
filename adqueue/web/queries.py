"""The read side of the morning review (`adqueue serve`): every query its pages run.

Nothing here reads a night's rows to count them: counts, score histograms, quantiles and folder
rates come from the job summaries kept as shards close (store/summaries.py); lists are read along
an index, the flagged images by keyset on (score, id) through ix_results_flagged. A page costs the
same for a night of 100 or 10,000,000 images. Portable between SQLite and PostgreSQL.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from threading import Lock
from typing import Any
from urllib.parse import quote

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from adqueue.store import summaries
from adqueue.store.models import (
    Job,
    JobFolder,
    JobKind,
    JobSummary,
    Metric,
    Model,
    Result,
    Review,
    ReviewVerdict,
)
from adqueue.store.queries import JobRow, list_jobs

# Trend: scores kept per job for the drift test, evenly spaced over the normal part of the
# summary's histogram. The KS statistic of such a sample is within about 1/TREND_SAMPLE (plus
# a bin's share) of the full night's.
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
    # Keyset pages: what the links to the previous and next page and back to this one add to
    # their query string (the first row of the page they lead to).
    prev_extra: str = ""
    next_extra: str = ""
    here_extra: str = ""

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
    """The job's lowest and highest score: the two ends of ix_results_job_score."""
    scored = select(Result.score).where(Result.job_id == job_id, Result.score.is_not(None)).limit(1)
    return (session.scalar(scored.order_by(Result.score)), session.scalar(scored.order_by(Result.score.desc())))


def _summary(session: Session, job_id: int) -> JobSummary | None:
    return session.get(JobSummary, job_id)


def score_histogram(session: Session, job_id: int, edges: Sequence[float]) -> list[int]:
    """How many of the job's scores fall in each bin [edges[i], edges[i+1]) (the last bin closed),
    from its summary's finer bins (each counted where its middle falls)."""
    n_bins = len(edges) - 1
    if n_bins < 1:
        return [0] * max(n_bins, 0)
    counts = [0] * n_bins
    for key, count in summaries.histogram(session, job_id).items():
        index = bisect_right(edges, summaries.bin_value(key)) - 1
        counts[min(max(index, 0), n_bins - 1)] += count
    return counts


def _latest_verdicts(session: Session, result_ids: Sequence[int]) -> dict[int, tuple[str, str]]:
    if not result_ids:
        return {}
    latest = select(func.max(Review.id)).where(Review.result_id.in_(result_ids)).group_by(Review.result_id)
    return {result_id: (verdict, reviewer) for result_id, verdict, reviewer in session.execute(
        select(Review.result_id, Review.verdict, Review.reviewer).where(Review.id.in_(latest)))}


def _latest_reviews(result_filter: Any) -> Any:
    """The id of each result's latest review, for the results matching `result_filter`."""
    return (select(func.max(Review.id)).join(Result, Result.id == Review.result_id)
            .where(result_filter).group_by(Review.result_id))


def parse_cursor(raw: str | None) -> tuple[float, int] | None:
    """A flagged page's first row, (score, id), as its links carry it ("SCORE_ID"); None if absent
    or malformed."""
    score, _, row_id = (raw or "").rpartition("_")
    try:
        return float(score), int(row_id)
    except ValueError:
        return None


def _cursor(param: str, score: float | None, row_id: int) -> str:
    return f"&{param}=" + quote(f"{score!r}_{row_id}")


def flagged_page(session: Session, job_id: int, page: int, per_page: int,
                 start: tuple[float, int] | None = None) -> Page:
    """The job's flagged images, worst first (score, then id, descending), with each one's latest
    verdict: `per_page` rows from `start` (a row's (score, id); None: from the top), read along
    ix_results_flagged. `page` is the number shown."""
    summary = _summary(session, job_id)
    total = int(summary.n_flagged) if summary else 0
    flagged = [Result.job_id == job_id, Result.is_anomaly.is_(True)]
    query = select(Result.id, Result.path, Result.score, Result.heatmap_path, Result.width, Result.height).where(*flagged)
    prev_extra = ""
    if start is None:
        page = 1
    else:
        score, row_id = start
        query = query.where(Result.score <= score, or_(Result.score < score, Result.id <= row_id))
        before = list(session.execute(
            select(Result.score, Result.id).where(*flagged, Result.score >= score,
                                                  or_(Result.score > score, Result.id > row_id))
            .order_by(Result.score, Result.id).limit(per_page)).all())
        page = max(page, 2) if before else 1
        prev_extra = _cursor("from", *before[-1]) if len(before) == per_page and page > 2 else ""
    rows = session.execute(query.order_by(Result.score.desc(), Result.id.desc()).limit(per_page + 1)).all()
    shown = rows[:per_page]
    verdicts = _latest_verdicts(session, [row.id for row in shown])
    return Page(
        [FlaggedRow(*row, *verdicts.get(row.id, (None, None))) for row in shown], total, page, per_page,
        prev_extra=prev_extra, next_extra=_cursor("from", rows[-1].score, rows[-1].id) if len(rows) > per_page else "",
        here_extra=_cursor("from", *start) if start is not None and page > 1 else "")


def error_page(session: Session, job_id: int, page: int, per_page: int) -> Page:
    """The job's result rows with an error, by path: list of (path, error), read along
    ix_results_errors (a night's errors, not its rows)."""
    summary = _summary(session, job_id)
    total = int(summary.n_errors) if summary else 0
    page = _clamp(page, total, per_page)
    rows = session.execute(select(Result.path, Result.error).where(Result.job_id == job_id, Result.error.is_not(None))
                           .order_by(Result.path).offset((page - 1) * per_page).limit(per_page)).all()
    return Page([tuple(row) for row in rows], total, page, per_page)


def _clamp(page: int, total: int, per_page: int) -> int:
    return min(max(1, page), max(1, -(-total // per_page)))


def folder_rates(session: Session, job_id: int, limit: int = 500) -> list[FolderRate]:
    """Counts per directory of the job's result paths (text forms, so "/" separates as on the OS)."""
    rows = session.execute(
        select(JobFolder.folder, JobFolder.n_rows, JobFolder.n_scored, JobFolder.n_flagged, JobFolder.n_errors)
        .where(JobFolder.job_id == job_id).order_by(JobFolder.folder).limit(limit)
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


class _ShapeCache:
    """Quantiles and normal sample per (job, summary version): a night that ended is read once."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.items: OrderedDict[Any, tuple[dict[int, float], list[float]]] = OrderedDict()
        self.lock = Lock()

    def get(self, key: Any) -> tuple[dict[int, float], list[float]] | None:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
            return self.items.get(key)

    def put(self, key: Any, value: tuple[dict[int, float], list[float]]) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_shape_cache = _ShapeCache()


def _shape(histogram: Mapping[int, int], n_normal: int) -> tuple[dict[int, float], list[float]]:
    ranked = summaries.Ranked(histogram)
    quantiles = {percent: value for percent in QUANTILES if (value := ranked.quantile(percent / 100)) is not None}
    # Not flagged means at or below the threshold: the lowest n_normal scores are the normal part.
    return quantiles, ranked.evenly_spaced(n_normal, TREND_SAMPLE)


def trend(session: Session, model_name: str, source: str, limit: int = 90) -> list[TrendPoint]:
    """The latest `limit` score jobs of any version of `model_name` on `source`, oldest first, with
    anomaly rate, score quantiles and a sample of the normal scores (not flagged), all from their
    summaries."""
    jobs = session.execute(
        select(Job.id, Job.model_id, Model.version, Job.status, Job.created_at, Model.threshold)
        .join(Model, Model.id == Job.model_id)
        .where(Model.name == model_name, Job.source == source, Job.kind == JobKind.SCORE)
        .order_by(Job.id.desc()).limit(limit)
    ).all()
    points = {row[0]: TrendPoint(*row) for row in reversed(jobs)}
    if not points:
        return []
    found = session.execute(
        select(JobSummary.job_id, JobSummary.n_scored, JobSummary.n_flagged, JobSummary.n_normal,
               JobSummary.updated_at).where(JobSummary.job_id.in_(list(points)))).all()
    keys = {job_id: (job_id, str(updated_at), int(n_normal), TREND_SAMPLE) for job_id, _, _, n_normal, updated_at in found}
    missing = [job_id for job_id, key in keys.items() if _shape_cache.get(key) is None]
    histograms = summaries.histograms(session, missing)
    for job_id, n_scored, n_flagged, n_normal, _ in found:
        point = points[job_id]
        point.n_scored, point.n_flagged, point.n_normal = int(n_scored), int(n_flagged), int(n_normal)
        shape = _shape_cache.get(keys[job_id])
        if shape is None:
            shape = _shape(histograms.get(job_id, {}), point.n_normal)
            _shape_cache.put(keys[job_id], shape)
        point.quantiles, point.normal_sample = dict(shape[0]), list(shape[1])
    return list(points.values())
