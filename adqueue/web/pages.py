"""The pages of `adqueue serve`: each handler reads through web/queries.py and renders a template.

Handlers that only read are plain functions: Starlette runs them in its thread pool, so a slow
query never blocks the event loop. The one that writes (a review) reads its form asynchronously
and then does the same.
"""

from __future__ import annotations

import posixpath
from typing import Any
from urllib.parse import quote, unquote

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from adqueue.jobs.drift import KS_CUTOFF, KS_MIN_SAMPLES, drift
from adqueue.store.notifications import ended_alarms
from adqueue.store.queries import job_unwritten_note
from adqueue.store.reviews import ReviewError, clean_reviewer, record_review
from adqueue.store.session import Store
from adqueue.web import detail_queries as dq
from adqueue.web import queries as q
from adqueue.web.charts import (
    Series,
    bin_counts,
    bin_edges,
    histogram_svg,
    line_chart_svg,
)

REVIEWER_COOKIE = "adqueue_reviewer"
FLAGGED_PER_PAGE = 24
ERRORS_PER_PAGE = 50
HISTOGRAM_BINS = 40
REFRESH_S = 5  # the jobs page reloads itself this often while a job is active


def _store(request: Request) -> Store:
    return request.app.state.context.store


def _render(request: Request, template: str, **context: Any) -> Response:
    return request.app.state.templates.TemplateResponse(request, template, context)


def _int_param(request: Request, name: str, default: int = 1) -> int:
    raw = request.query_params.get(name, "")
    return int(raw) if raw.isdigit() and len(raw) < 10 else default


def reviewer_of(request: Request) -> str:
    return clean_reviewer(unquote(request.cookies.get(REVIEWER_COOKIE, "")))


def _remember_reviewer(response: Response, reviewer: str) -> None:
    # Percent-encoded: a cookie carries ASCII only, and names need not be.
    response.set_cookie(REVIEWER_COOKIE, quote(reviewer, safe=""), max_age=365 * 86400, samesite="strict")


def jobs_page(request: Request) -> Response:
    with _store(request).session() as session:
        jobs = q.recent_jobs(session, limit=100)
        alarms = ended_alarms(session, [job.id for job in jobs])
    refresh = REFRESH_S if any(job.active for job in jobs) else None
    return _render(request, "jobs.html", jobs=jobs, refresh=refresh, alarms=alarms)


def relative_folder(folder: str, source: str) -> str:
    """A result's directory (text form, trailing "/") relative to the job's source: "." for the top."""
    for base in (source.rstrip("/"), posixpath.dirname(source.rstrip("/"))):  # a folder, or a manifest's
        if base and (folder == base + "/" or folder.startswith(base + "/")):
            return folder[len(base) + 1:].rstrip("/") or "."
    return folder.rstrip("/") or "."


def job_page(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    page, errors_page = _int_param(request, "page"), _int_param(request, "errors_page")
    with _store(request).session() as session:
        job = q.job(session, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        model = q.model(session, job.model_id) if job.model_id else None
        low, high = q.score_range(session, job_id)
        calibration = model.calibration_scores if model else []
        threshold = model.threshold if model else None
        bounds = [v for v in (low, high, threshold) if v is not None] + calibration  # one scale for all three
        edges = bin_edges(min(bounds), max(bounds), HISTOGRAM_BINS) if low is not None else []
        night = q.score_histogram(session, job_id, edges) if edges else []
        start = q.parse_cursor(request.query_params.get("from"))
        flagged = q.flagged_page(session, job_id, page, FLAGGED_PER_PAGE, start)
        errors = q.error_page(session, job_id, errors_page, ERRORS_PER_PAGE)
        folders = q.folder_rates(session, job_id)
        reviews = q.review_counts(session, job_id)
        unwritten = job_unwritten_note(session, job_id)
        alarms = ended_alarms(session, [job_id]).get(job_id, [])
        params = dq.job_params(session, job_id)
        metrics = dq.job_metrics(session, job_id)
        labels = dq.card_labels(session, [row.id for row in flagged.rows]) if job.kind == "evaluate" else {}
        warnings = dq.model_warnings(session, job.model_id) if job.kind == "train" and job.model_id else []
    histogram = histogram_svg(edges, night, bin_counts(calibration, edges), threshold) if edges else None
    folder_rows = [(relative_folder(f.folder, job.source), f) for f in folders]
    return _render(request, "job.html", job=job, model=model, histogram=histogram, n_calibration=len(calibration),
                   flagged=flagged, flagged_from=request.query_params.get("from", "") if flagged.here_extra else "",
                   errors=errors, folders=folder_rows, reviews=reviews, reviewer=reviewer_of(request),
                   unwritten=unwritten, alarms=alarms, params=params, metrics=metrics, labels=labels, warnings=warnings,
                   heatmaps=params.get("heatmaps", "flagged"))


def result_page(request: Request) -> Response:
    """One result at full size: the image beside its heat map, with its score and label."""
    result_id = request.path_params["result_id"]
    with _store(request).session() as session:
        result = dq.result_detail(session, result_id)
        if result is None:
            raise HTTPException(404, f"no result {result_id}")
        job = q.job(session, result.job_id)
        model = q.model(session, job.model_id) if job and job.model_id else None
    return _render(request, "result.html", result=result, job=job, model=model)


def model_page(request: Request) -> Response:
    name = request.path_params["name"]
    with _store(request).session() as session:
        versions = q.model_versions(session, name)
        evaluations = q.evaluations(session, [m.id for m in versions])
    if not versions:
        raise HTTPException(404, f"no model {name!r}")
    by_model: dict[int, list[q.Evaluation]] = {}
    for evaluation in evaluations:
        by_model.setdefault(evaluation.model_id, []).append(evaluation)
    return _render(request, "model.html", name=name, versions=list(reversed(versions)), evaluations=by_model)


def trend_page(request: Request) -> Response:
    name, source = request.query_params.get("model", ""), request.query_params.get("source", "")
    if not name or not source:
        raise HTTPException(400, "the trend needs ?model=NAME&source=SOURCE (links on each job page)")
    with _store(request).session() as session:
        points = q.trend(session, name, source)
        models = {m.id: m for m in q.model_versions(session, name)}
    rows = []
    for point in points:
        model = models.get(point.model_id) if point.model_id is not None else None
        threshold = point.threshold
        calibration = [s for s in (model.calibration_scores if model else []) if threshold is None or s <= threshold]
        rows.append((point, drift(point.normal_sample, calibration, n_night=point.n_normal)))
    labels = [f"job {p.job_id}" for p in points]
    rate_chart = line_chart_svg(labels, [Series("anomaly rate", [p.anomaly_rate for p in points])], percent=True)
    score_chart = line_chart_svg(labels, [
        *(Series(f"p{pct}", [p.quantiles.get(pct) for p in points]) for pct in q.QUANTILES),
        Series("threshold", [p.threshold for p in points], dashed=True),
    ])
    return _render(request, "trend.html", name=name, source=source, rows=rows, rate_chart=rate_chart,
                   score_chart=score_chart, warnings=[(p, d) for p, d in rows if d.warn], cutoff=KS_CUTOFF,
                   min_samples=KS_MIN_SAMPLES, quantiles=q.QUANTILES)


async def review(request: Request) -> Response:
    """Record a verdict on one result, then back to its job page at the same image."""
    result_id = request.path_params["result_id"]
    form = await request.form()
    verdict, page = str(form.get("verdict", "")), str(form.get("page", "1"))
    start = q.parse_cursor(str(form.get("from", "")))
    reviewer = clean_reviewer(str(form.get("reviewer") or "")) if form.get("reviewer") else reviewer_of(request)

    def write() -> int:
        with _store(request).session() as session:
            record_review(session, result_id, verdict, reviewer)
            job_id = q.result_job(session, result_id)
            assert job_id is not None, "record_review found the result"
            return job_id

    try:
        job_id = await run_in_threadpool(write)
    except ReviewError as exc:
        raise HTTPException(404 if "no result" in str(exc) else 400, str(exc)) from None
    at = f"&from={quote(f'{start[0]!r}_{start[1]}')}" if start else ""
    target = f"/jobs/{job_id}?page={int(page) if page.isdigit() and len(page) < 10 else 1}{at}#r{result_id}"
    response = RedirectResponse(target, status_code=303)
    _remember_reviewer(response, reviewer)
    return response


async def set_reviewer(request: Request) -> Response:
    """Remember who is reviewing (a cookie), then back to the job page the form was on."""
    form = await request.form()
    job_id = str(form.get("job_id", ""))
    target = f"/jobs/{job_id}" if job_id.isdigit() and len(job_id) < 10 else "/"
    response = RedirectResponse(target, status_code=303)
    _remember_reviewer(response, clean_reviewer(str(form.get("reviewer") or "")))
    return response
