"""The Starlette application behind `adqueue serve`: routes, templates, the one stylesheet.

Imports stay light on purpose (no torch, no detector, no job or runner module that pulls them in): the
server reads SQL and a few files, and starts in well under a second.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib import resources
from urllib.parse import quote

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from adqueue.core.clock import aware
from adqueue.jobs.context import Context
from adqueue.web import pages
from adqueue.web import queries as q
from adqueue.web.auth import Guard
from adqueue.web.files import Refused, heatmap_image, result_image
from adqueue.web.metrics import exposition, metrics_registry

log = logging.getLogger(__name__)
IMAGE_CACHE = "private, max-age=300"


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    moment = aware(moment)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _templates() -> Jinja2Templates:
    environment = jinja2.Environment(loader=jinja2.PackageLoader("adqueue.web", "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    environment.filters.update(num=_num, pct=_pct, duration=_duration, when=_when,
                               segment=lambda text: quote(str(text), safe=""))
    return Jinja2Templates(env=environment)


def _image_response(read: Callable[[], tuple[bytes, str]], what: str) -> Response:
    try:
        data, media_type = read()
    except Refused as exc:
        log.warning("refused to serve %s: %s", what, exc)
        return PlainTextResponse("403: this file is not served", status_code=403)
    return Response(data, media_type=media_type, headers={"Cache-Control": IMAGE_CACHE})


def result_file(request: Request) -> Response:
    """The original image of one result row, and nothing else (see files.py)."""
    result_id = request.path_params["result_id"]
    context: Context = request.app.state.context
    with context.store.session() as session:
        row = q.result_files(session, result_id)
    if row is None:
        raise HTTPException(404, f"no result {result_id}")
    path, sha256, _ = row
    return _image_response(lambda: result_image(path, sha256, context.settings.max_file_bytes), f"result {result_id}")


def heatmap_file(request: Request) -> Response:
    """The heat map of one result row, from the data dir's heatmaps/ folder only (see files.py)."""
    result_id = request.path_params["result_id"]
    context: Context = request.app.state.context
    with context.store.session() as session:
        row = q.result_files(session, result_id)
    if row is None or not row[2]:
        raise HTTPException(404, f"no heat map for result {result_id}")
    relative = row[2]
    return _image_response(lambda: heatmap_image(context.data_dir, relative, context.settings.max_file_bytes),
                           f"the heat map of result {result_id}")


def _stylesheet() -> Callable[[Request], Response]:
    css = resources.files("adqueue.web").joinpath("static", "adqueue.css").read_bytes()  # read once, at start

    def stylesheet(_request: Request) -> Response:
        return Response(css, media_type="text/css", headers={"Cache-Control": "public, max-age=3600"})

    return stylesheet


def _metrics() -> Callable[[Request], Response]:
    from prometheus_client import CONTENT_TYPE_LATEST

    def metrics(request: Request) -> Response:
        """Prometheus's view of the jobs (web/metrics.py); behind the same token as every page."""
        return Response(exposition(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)

    return metrics


async def _http_error(request: Request, exc: Exception) -> Response:
    """A page with the way back for a browser; one plain line for a script."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "server error"
    if "text/html" in request.headers.get("accept", ""):
        return request.app.state.templates.TemplateResponse(request, "error.html", {"status": status, "detail": detail},
                                                            status_code=status)
    return PlainTextResponse(f"{status}: {detail}", status_code=status)


def create_app(context: Context, *, token: str | None = None, allowed_hosts: Iterable[str] | None = None) -> Starlette:
    """The web app over `context`'s database and data dir. token: required on every request when
    set; allowed_hosts: the Host names accepted (None: any)."""
    routes = [
        Route("/", pages.jobs_page),
        Route("/jobs/{job_id:int}", pages.job_page),
        Route("/models/{name}", pages.model_page),
        Route("/trend", pages.trend_page),
        Route("/results/{result_id:int}", pages.result_page),
        Route("/results/{result_id:int}/review", pages.review, methods=["POST"]),
        Route("/reviewer", pages.set_reviewer, methods=["POST"]),
        Route("/files/result/{result_id:int}", result_file),
        Route("/files/heatmap/{result_id:int}", heatmap_file),
        Route("/static/adqueue.css", _stylesheet()),
        Route("/metrics", _metrics()),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, token=token, allowed_hosts=allowed_hosts)],
                    exception_handlers={HTTPException: _http_error})
    app.state.context = context
    app.state.metrics = metrics_registry(context.store)
    app.state.templates = _templates()
    return app

