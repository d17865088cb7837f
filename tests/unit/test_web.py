"""`adqueue serve` against a real SQLite store filled by really training and scoring (embedded).

Pages are checked against SQL, files against what may be read, the token, reviews and drift.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from PIL import Image
from scipy.stats import ks_2samp
from sqlalchemy import func, select, update

from adqueue.core.config import Settings, sqlite_url
from adqueue.jobs.context import Context
from adqueue.jobs.drift import KS_CUTOFF, ks_statistic
from adqueue.jobs.reconcile import build_missing_summaries
from adqueue.store.models import (
    Base,
    Job,
    JobKind,
    JobStatus,
    Metric,
    Model,
    Result,
    Review,
)
from adqueue.web import pages
from adqueue.web import queries as web_queries
from adqueue.web.app import create_app
from benchmarks.harness.cli import FAST_MVG
from benchmarks.harness.servers import REPO
from tests.helpers.cli import invoke_cli

with warnings.catch_warnings():  # Starlette 1.x prefers the httpx2 fork for its TestClient; httpx works
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff"
LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, textures) -> dict:
    """A data dir where a model was trained, a dump scored (with heat maps), the MVTec root scored
    (sub-folders) and the model evaluated: job ids and the Context the server runs on."""
    root, dump = textures
    data_dir = tmp_path_factory.mktemp("web")

    def run(*args: str) -> int:
        out = invoke_cli(data_dir, *args, "--format", "json")
        return int(json.loads(out.stdout)["job_id"])

    ids = {
        "train": run("train", "--data", str(root), "--name", "bricks", *FAST_MVG),
        "score": run("score", "--model", "bricks", str(dump), "--heatmaps", "all", "--shard-size", "5"),
        "tree": run("score", "--model", "bricks", str(root), "--heatmaps", "none"),
        "evaluate": run("evaluate", "--model", "bricks", "--data", str(root), "--heatmaps", "none"),
    }
    settings = Settings.load(data_dir=data_dir, database_url=sqlite_url(data_dir / "adqueue.db"), broker_url="")
    context = Context(settings)
    yield {"dir": data_dir, "ids": ids, "context": context, "dump": dump}
    context.close()


@pytest.fixture
def client(deployment: dict) -> Iterator[TestClient]:
    with TestClient(create_app(deployment["context"]), base_url=LOCAL) as test_client:
        yield test_client


def sql(deployment: dict, statement):
    with deployment["context"].store.session() as session:
        return session.execute(statement).all()


def flagged_ids(deployment: dict, job_id: int) -> list[int]:
    rows = sql(deployment, select(Result.id).where(Result.job_id == job_id, Result.is_anomaly.is_(True))
               .order_by(Result.score.desc(), Result.id.desc()))
    return [row[0] for row in rows]


def cells(html: str, row_attr: str) -> list[str]:
    row = re.search(rf"<tr {row_attr}[^>]*>(.*?)</tr>", html, re.DOTALL)
    assert row, row_attr
    return [re.sub(r"<[^>]+>|\s+", " ", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.DOTALL)]


def text_of(html: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}">(.*?)<', html, re.DOTALL)
    assert found, element_id
    return found.group(1).strip()


def test_jobs_page_shows_every_job_with_its_counts(deployment: dict, client: TestClient) -> None:
    html = client.get("/").text
    job_id = deployment["ids"]["score"]
    rows = sql(deployment, select(Result.is_anomaly, Result.error, Result.score).where(Result.job_id == job_id))
    flagged = sum(bool(r.is_anomaly) for r in rows)
    errors, scored = sum(r.error is not None for r in rows), sum(r.score is not None for r in rows)
    n_files = len(list(deployment["dump"].iterdir()))
    row = cells(html, f'data-job-id="{job_id}"')
    assert row[1:3] == ["score", "done"] and row[3] == "bricks:1"
    assert row[4].startswith(f"{n_files} / {n_files}") and row[5] == str(n_files)
    assert row[6:9] == [str(flagged), str(errors), f"{flagged / scored:.1%}"]
    assert errors == 2 and all(f'data-job-id="{i}"' in html for i in deployment["ids"].values())
    assert 'http-equiv="refresh"' not in html  # nothing is running
    with deployment["context"].store.session() as session:
        running = Job(kind=JobKind.SCORE, status=JobStatus.RUNNING, source="/x", params={}, n_total=10, n_done=4)
        session.add(running)
    try:
        html = client.get("/").text
        assert 'http-equiv="refresh"' in html and cells(html, f'data-job-id="{running.id}"')[4].startswith("4 / 10")
    finally:
        with deployment["context"].store.session() as session:
            session.execute(Job.__table__.delete().where(Job.id == running.id))


def test_job_page_numbers_match_sql(deployment: dict, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = deployment["ids"]["score"]
    expected = flagged_ids(deployment, job_id)
    assert expected
    html = client.get(f"/jobs/{job_id}").text
    assert text_of(html, "flagged-count") == str(len(expected))
    assert '<svg class="chart"' in html and "threshold" in html
    with deployment["context"].store.session() as session:
        model = web_queries.model(session, session.get(Job, job_id).model_id)
    assert f"the model's {len(model.calibration_scores)} calibration scores" in html and model.calibration_scores
    assert "line3_corrupt.png" in html and "operator_notes.txt" in html  # the error rows
    # Paged: walk every page of a small page size; the images come worst first, each exactly once.
    monkeypatch.setattr(pages, "FLAGGED_PER_PAGE", 3)
    shown: list[int] = []
    url = f"/jobs/{job_id}"
    n_pages = -(-len(expected) // 3)
    for page in range(1, n_pages + 1):  # by the pages' own links: each carries its first row (keyset)
        html = client.get(url).text
        on_page = [int(i) for i in re.findall(r'<article class="card flagged-image" id="r(\d+)"', html)]
        assert 1 <= len(on_page) <= 3 and f"page {page} of {n_pages}" in html
        for result_id in on_page:  # each the original beside its heat map
            assert f'src="/files/result/{result_id}"' in html and f'src="/files/heatmap/{result_id}"' in html
        shown += on_page
        links = re.findall(r'<a href="(\?[^"]*)" rel="(prev|next)">', html)
        if page > 1:  # back and forth again lands on this very page
            back = client.get(f"/jobs/{job_id}" + dict((r, h) for h, r in links)["prev"].replace("&amp;", "&")).text
            forth = re.search(r'<a href="(\?[^"]*)" rel="next">', back)
            assert forth and client.get(f"/jobs/{job_id}" + forth.group(1).replace("&amp;", "&")).text == html
        if page < n_pages:
            url = f"/jobs/{job_id}" + dict((r, h) for h, r in links)["next"].replace("&amp;", "&")
        else:
            assert "next" not in dict((r, h) for h, r in links)
    assert shown == expected
    assert client.get(f"/jobs/{job_id}?page=999").status_code == 200  # no row given: the first page
    assert client.get(f"/jobs/{job_id}?page=2&from=junk").status_code == 200
    assert client.get("/jobs/999999").status_code == 404


def test_job_page_says_what_a_full_disk_kept_from_being_written(deployment: dict, client: TestClient) -> None:
    """The counts themselves come from a real full tmpfs (tests/integration/test_full_disk.py);
    here, that the page says them."""
    job_id = deployment["ids"]["tree"]
    assert 'id="unwritten"' not in client.get(f"/jobs/{job_id}").text
    with deployment["context"].store.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            n_heatmaps_unwritten=3, unwritten_reason="No space left on device"))
    try:
        html = client.get(f"/jobs/{job_id}").text
        assert text_of(html, "unwritten") == "3 heat map(s) not written: No space left on device; the scores are kept"
    finally:
        with deployment["context"].store.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(n_heatmaps_unwritten=0, unwritten_reason=None))


def test_sub_folder_rates_match_sql(deployment: dict, client: TestClient) -> None:
    job_id = deployment["ids"]["tree"]
    source = sql(deployment, select(Job.source).where(Job.id == job_id))[0][0]
    expected: dict[str, list[int]] = {}
    for path, flagged, _score in sql(deployment, select(Result.path, Result.is_anomaly, Result.score)
                                    .where(Result.job_id == job_id)):
        folder = str(Path(path).parent.relative_to(source))
        expected.setdefault(folder, [0, 0])
        expected[folder][0] += 1
        expected[folder][1] += bool(flagged)
    assert {"train/good", "test/good", "test/scratch"} <= set(expected)
    html = client.get(f"/jobs/{job_id}").text
    section = html[html.index('id="folders"'):html.index('id="errors"')]
    for folder, (n, flagged) in expected.items():
        row = re.search(rf"<code>{re.escape(folder)}</code></td>(.*?)</tr>", section, re.DOTALL)
        assert row, folder
        numbers = re.findall(r'<td class="n">([^<]*)</td>', row.group(1))
        assert numbers[0] == str(n) and numbers[2] == str(flagged) and numbers[3] == f"{flagged / n:.1%}"


def test_a_review_writes_one_row_and_the_latest_verdict_counts(deployment: dict, client: TestClient) -> None:
    job_id = deployment["ids"]["score"]
    first, second = flagged_ids(deployment, job_id)[:2]
    assert text_of(client.get(f"/jobs/{job_id}").text, "precision") == "—"
    reply = client.post(f"/results/{first}/review", data={"verdict": "defect", "reviewer": "ana", "page": "1"},
                        follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == f"/jobs/{job_id}?page=1#r{first}"
    reply = client.post(f"/results/{first}/review", follow_redirects=False,
                        data={"verdict": "defect", "reviewer": "ana", "page": "2", "from": "1.5_7"})
    assert reply.headers["location"] == f"/jobs/{job_id}?page=2&from=1.5_7#r{first}"  # back to the same page
    assert sql(deployment, select(func.count()).select_from(Review))[0][0] == 2
    assert text_of(client.get(f"/jobs/{job_id}").text, "precision") == "100.0%"
    client.post(f"/results/{second}/review", data={"verdict": "false_alarm"})  # the cookie says who: ana
    html = client.get(f"/jobs/{job_id}").text
    assert text_of(html, "precision") == "50.0%" and "1 defect, 1 false alarm" in html
    client.post(f"/results/{second}/review", data={"verdict": "defect", "reviewer": "bo"})  # changed her mind
    assert text_of(client.get(f"/jobs/{job_id}").text, "precision") == "100.0%"
    out = invoke_cli(deployment["dir"], "sql", "SELECT r.verdict, r.reviewer, x.path FROM reviews r JOIN results x "
                     "ON x.id = r.result_id ORDER BY r.id", "--format", "json")
    rows = json.loads(out.stdout)
    assert [(r["verdict"], r["reviewer"]) for r in rows] == [("defect", "ana"), ("defect", "ana"), ("false_alarm", "ana"),
                                                             ("defect", "bo")]
    assert client.post(f"/results/{first}/review", data={"verdict": "maybe"}).status_code == 400
    assert client.post("/results/999999/review", data={"verdict": "defect"}).status_code == 404
    for forged in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        cross_site = client.post(f"/results/{first}/review", data={"verdict": "defect"}, headers=forged)
        assert cross_site.status_code == 403, forged
    assert sql(deployment, select(func.count()).select_from(Review))[0][0] == 4


def test_model_page_shows_versions_settings_and_every_metric(deployment: dict, client: TestClient) -> None:
    html = client.get("/models/bricks").text
    eval_id = deployment["ids"]["evaluate"]
    metrics = sql(deployment, select(Model.detector, Model.backbone, Model.threshold, Model.params))[0]
    assert "mvg" in html and "efficientnet_lite0" in html and f"{metrics[2]:.6g}" in html
    assert "<code>image_size=128</code>" in html and f'href="/jobs/{eval_id}"' in html
    stored = sql(deployment, select(Metric.name, Metric.value).where(Metric.job_id == eval_id))
    assert {"image_auroc", "image_auroc[scratch]", "pixel_auroc", "pro"} <= {name for name, _ in stored}
    for name, value in stored:
        assert f"<code>{name}</code></td><td class=\"n\">{value:.4g}</td>" in html, name
    assert client.get("/models/nope").status_code == 404


def test_trend_quantiles_are_exact_and_drift_is_flagged(deployment: dict, client: TestClient,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = deployment["context"].store
    rng = np.random.default_rng(3)
    with store.session() as session:
        model = session.scalars(select(Model).where(Model.name == "bricks")).one()
        threshold, saved = model.threshold, dict(model.params)
        spread = threshold / 10
        calibration = [float(v) for v in threshold - 3 * spread + spread * rng.standard_normal(120)]
        session.execute(update(Model).where(Model.id == model.id)
                        .values(params={**saved, "calibration": {"scores": calibration}}))
        nights = {}
        for shift in (0.0, 2.0):  # the same distribution, then normal scores two spreads higher
            job = Job(kind=JobKind.SCORE, status=JobStatus.DONE, model_id=model.id, source="/line7/nightly",
                      params={}, n_total=150, n_done=150)
            session.add(job)
            session.flush()
            scores = threshold - (3 - shift) * spread + spread * rng.standard_normal(150)
            session.add_all([Result(job_id=job.id, model_id=model.id, path=f"/line7/nightly/{i}.png", score=float(s),
                                    is_anomaly=bool(s > threshold)) for i, s in enumerate(scores)])
            nights[shift] = (job.id, np.sort(scores))
    assert build_missing_summaries(store) == 2  # rows loaded straight into the table: the reconciler's part
    try:
        html = client.get("/trend", params={"model": "bricks", "source": "/line7/nightly"}).text
        for shift, (job_id, scores) in nights.items():
            row = cells(html, f'data-job-id="{job_id}"')
            normal, cut = scores[scores <= threshold], [c for c in calibration if c <= threshold]
            assert row[0] == str(job_id) and (f'<tr data-job-id="{job_id}" class="drifting">' in html) == bool(shift)
            for cell, percent in zip(row[7:10], (50, 90, 99), strict=True):  # within a bin of the summary
                assert float(cell) == pytest.approx(scores[int(np.ceil(percent / 100 * len(scores))) - 1], rel=2e-3)
            assert float(row[11].split()[0]) == pytest.approx(ks_2samp(normal, cut).statistic, abs=0.02)
            assert (ks_2samp(normal, cut).statistic > KS_CUTOFF) == bool(shift)
        warning = html[html.index('id="drift-warning"'):]
        assert f"job {nights[2.0][0]}" in warning[:600] and f"job {nights[0.0][0]} " not in warning[:600]
        # Large nights are sampled: quantiles stay within a bin, the sample is bounded.
        monkeypatch.setattr(web_queries, "TREND_SAMPLE", 10)
        with store.session() as session:
            points = {p.job_id: p for p in web_queries.trend(session, "bricks", "/line7/nightly")}
        job_id, scores = nights[0.0]
        assert points[job_id].quantiles[90] == pytest.approx(scores[int(np.ceil(0.9 * 150)) - 1], rel=1e-3)
        assert 5 <= len(points[job_id].normal_sample) <= 13
    finally:
        with store.session() as session:
            session.execute(update(Model).where(Model.name == "bricks").values(params=saved))
            session.execute(Job.__table__.delete().where(Job.id.in_([j for j, _ in nights.values()])))
    assert client.get("/trend").status_code == 400


def test_ks_statistic_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    for n, m in ((5, 7), (50, 80), (200, 30)):
        a, b = rng.normal(size=n).round(1), rng.normal(0.3, size=m).round(1)  # rounded: ties too
        assert ks_statistic(list(a), list(b)) == pytest.approx(ks_2samp(a, b).statistic)


def raw_get(app, raw_path: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes]:
    """One request with an exact path, bypassing any client's URL normalization."""
    from urllib.parse import unquote_to_bytes

    path, _, query = raw_path.partition(b"?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote_to_bytes(path).decode("latin-1"), "raw_path": path, "query_string": query,
             "root_path": "", "headers": [(b"host", b"127.0.0.1"), *(headers or [])],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize("raw", [
    b"/files/result/../../../../etc/passwd", b"/files/result/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    b"/files/heatmap/..%2f..%2f..%2fetc%2fpasswd", b"/files/result//etc/passwd", b"/files//etc/passwd",
    b"/etc/passwd", b"/static/../../../../etc/passwd", b"/static/adqueue.css/../../../etc/passwd",
    b"/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", b"/files/result/1/../../../../etc/passwd",
])
def test_no_route_takes_a_path(deployment: dict, raw: bytes) -> None:
    status, body = raw_get(create_app(deployment["context"]), raw)
    assert status in (403, 404) and b"root:" not in body


def set_result(deployment: dict, result_id: int, **values: object) -> None:
    with deployment["context"].store.session() as session:
        session.execute(update(Result).where(Result.id == result_id).values(**values))


def test_images_are_served_only_for_their_own_result(deployment: dict, client: TestClient, tmp_path: Path) -> None:
    job_id = deployment["ids"]["score"]
    result_id, other = flagged_ids(deployment, job_id)[:2]
    path, heatmap, other_path = *sql(deployment, select(Result.path, Result.heatmap_path).where(Result.id == result_id))[0], \
        sql(deployment, select(Result.path).where(Result.id == other))[0][0]
    image = client.get(f"/files/result/{result_id}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.headers["x-content-type-options"] == "nosniff" and image.content == Path(path).read_bytes()
    overlay = client.get(f"/files/heatmap/{result_id}")
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/jpeg"
    assert overlay.content.startswith(JPEG) and overlay.content == (deployment["dir"] / heatmap).read_bytes()
    older = deployment["dir"] / "heatmaps" / "older" / "written-before-2026-12.png"  # heat maps were PNGs
    older.parent.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(older)
    set_result(deployment, result_id, heatmap_path="heatmaps/older/written-before-2026-12.png")
    try:
        old = client.get(f"/files/heatmap/{result_id}")
        assert old.status_code == 200 and old.headers["content-type"] == "image/png" and old.content.startswith(PNG)
    finally:
        set_result(deployment, result_id, heatmap_path=heatmap)
    fifo, swapped = tmp_path / "camera.png", tmp_path / "swapped.png"
    os.mkfifo(fifo)
    swapped.write_bytes(Path(other_path).read_bytes())
    try:  # another image (its hash differs), a system file, a FIFO, a missing file: never served
        for bad in (str(swapped), "/etc/passwd", str(fifo), "/nonexistent/x.png", "../../../../etc/passwd"):
            set_result(deployment, result_id, path=bad)
            reply = client.get(f"/files/result/{result_id}")
            assert reply.status_code == 403 and b"root:" not in reply.content, bad
    finally:
        set_result(deployment, result_id, path=path)
    outside_png = tmp_path / "outside.png"
    outside_png.write_bytes(Path(path).read_bytes())
    links = deployment["dir"] / "heatmaps" / "links"
    links.mkdir(exist_ok=True)
    (links / "passwd.png").symlink_to("/etc/passwd")
    (links / "outside.png").symlink_to(outside_png)
    try:
        for bad in ("../../etc/passwd", "/etc/passwd", "heatmaps/links/passwd.png", "heatmaps/links/outside.png",
                    "adqueue.db", "heatmaps/../adqueue.db", "heatmaps/\x00.png"):
            set_result(deployment, result_id, heatmap_path=bad)
            reply = client.get(f"/files/heatmap/{result_id}")
            assert reply.status_code == 403 and b"root:" not in reply.content and b"SQLite" not in reply.content, bad
    finally:
        set_result(deployment, result_id, heatmap_path=heatmap)
    assert client.get(f"/files/heatmap/{result_id}").status_code == 200
    assert client.get("/files/result/999999").status_code == 404
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert sql(deployment, select(Result.sha256).where(Result.id == result_id))[0][0] == sha


def test_the_token_is_required_once_then_a_cookie(deployment: dict) -> None:
    app = create_app(deployment["context"], token="s3cret-token")
    with TestClient(app, base_url=LOCAL) as browser:
        assert browser.get("/").status_code == 401
        assert browser.get("/files/result/1").status_code == 401
        assert browser.get("/?token=wrong").status_code == 401
        first = browser.get("/jobs/1?token=s3cret-token", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/jobs/1"  # the token leaves the URL
        assert "s3cret-token" not in first.headers["set-cookie"] and "HttpOnly" in first.headers["set-cookie"]
        assert browser.get("/").status_code == 200  # the cookie from now on
    with TestClient(app, base_url=LOCAL) as script:
        assert script.get("/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert script.get("/", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_without_a_token_only_loopback_host_names_are_answered(deployment: dict) -> None:
    app = create_app(deployment["context"], allowed_hosts=("127.0.0.1", "localhost", "::1"))
    with TestClient(app, base_url=LOCAL) as local:
        assert local.get("/").status_code == 200
        assert local.get("/", headers={"Host": "localhost:8080"}).status_code == 200
        assert local.get("/", headers={"Host": "rebind.evil.example"}).status_code == 400


def test_serve_refuses_the_network_without_a_token(deployment: dict) -> None:
    out = invoke_cli(deployment["dir"], "serve", "--host", "0.0.0.0", ok=False)
    assert out.exit_code != 0 and "--token" in out.stderr


def test_the_web_app_imports_nothing_heavy() -> None:
    probe = "import sys, adqueue.web.app; print(sorted({'torch', 'sklearn', 'scipy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def fill_synthetic(context: Context) -> int:
    """A model, one score job in two folders with errors and reviews, at fixed times: the same rows
    (and ids) on any database. Returns the job id."""
    from datetime import UTC, datetime

    rng = np.random.default_rng(11)
    at = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)
    with context.store.session() as session:
        model = Model(name="tiles", version=1, detector="mvg", backbone="efficientnet_lite0", artifact_path="m",
                      threshold=10.0, created_at=at, params={"config": {"image_size": 128},
                                                             "calibration": {"scores": list(rng.normal(6, 1, 80))}})
        session.add(model)
        session.flush()
        job = Job(kind=JobKind.SCORE, status=JobStatus.DONE, model_id=model.id, source="/cam", params={},
                  n_total=130, n_done=125, n_failed=5, created_at=at, started_at=at, finished_at=at)
        session.add(job)
        session.flush()
        for i, score in enumerate(rng.normal(7, 2, 125)):
            session.add(Result(job_id=job.id, model_id=model.id, path=f"/cam/line{i % 2}/{i:03d}.png", sha256="0" * 64,
                               score=float(score), is_anomaly=bool(score > 10), scored_at=at))
        session.add_all([Result(job_id=job.id, path=f"/cam/line0/bad{i}.png", error="corrupt PNG file", scored_at=at)
                         for i in range(5)])
        session.flush()
        flagged = session.scalars(select(Result.id).where(Result.is_anomaly.is_(True)).order_by(Result.id)).all()
        session.add_all([Review(result_id=flagged[0], verdict="defect", reviewer="ana", created_at=at),
                         Review(result_id=flagged[1], verdict="false_alarm", reviewer="ana", created_at=at)])
        job_id = job.id
    assert build_missing_summaries(context.store) == 1  # loaded straight into the tables, as the reconciler finds it
    return job_id


def test_pages_read_the_same_on_postgresql(tmp_path: Path) -> None:
    from benchmarks.harness.servers import create_database, postgres_server

    pages_html: dict[str, list[str]] = {}
    with postgres_server() as server:
        for kind, url in (("sqlite", sqlite_url(tmp_path / "s.db")), ("postgres", create_database(server, "adq_web"))):
            context = Context(Settings.load(data_dir=tmp_path / kind, database_url=url, broker_url=""))
            job_id = fill_synthetic(context)
            with context.store.engine.connect() as connection:  # migration 0005 == the ORM here too
                assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == [], kind
            with TestClient(create_app(context), base_url=LOCAL) as browser:
                urls = ["/", f"/jobs/{job_id}", "/models/tiles", "/trend?model=tiles&source=%2Fcam"]
                replies = [browser.get(u) for u in urls]
            assert [r.status_code for r in replies] == [200] * 4, kind
            pages_html[kind] = [re.sub(r"\d+(\.\d+)? s\b|[\d.]+ images/s", "", r.text) for r in replies]  # durations
            context.close()
    assert pages_html["sqlite"] == pages_html["postgres"]
    job_page = pages_html["postgres"][1]
    assert text_of(job_page, "precision") == "50.0%" and "<code>line0</code>" in job_page
    assert 'data-job-id="1"' in pages_html["postgres"][3]


def test_alarms_show_on_the_jobs_list_and_the_job_page(deployment: dict, client: TestClient) -> None:
    score_id, tree_id = deployment["ids"]["score"], deployment["ids"]["tree"]
    # The dump has 2 unreadable files of 18 (11%, more than 5%): the `errors` alarm, computed at its end.
    assert cells(client.get("/").text, f'data-job-id="{score_id}"')[11] == "errors"
    assert cells(client.get("/").text, f'data-job-id="{tree_id}"')[11] == ""
    page = client.get(f"/jobs/{score_id}").text
    box = re.search(r'<ul class="alarm-box" id="alarms">(.*?)</ul>', page, re.DOTALL)
    assert box and "errors" in box.group(1) and "2 of 18 files could not be scored" in box.group(1)
    assert 'id="alarms"' not in client.get(f"/jobs/{tree_id}").text


def test_metrics_for_prometheus(deployment: dict, client: TestClient) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    tree_id = deployment["ids"]["tree"]  # the latest score job of model bricks
    flagged, scored = sql(deployment, select(func.count().filter(Result.is_anomaly.is_(True)), func.count(Result.score))
                          .where(Result.job_id == tree_id))[0]
    assert samples[("adqueue_model_anomaly_rate", (("model", "bricks"),))] == pytest.approx(flagged / scored)
    assert samples[("adqueue_model_flagged", (("model", "bricks"),))] == flagged
    assert samples[("adqueue_model_alarms", (("alarm", "errors"), ("model", "bricks")))] == 0
    assert samples[("adqueue_jobs_active", (("kind", "score"), ("status", "running")))] == 0


def test_evaluate_and_train_pages_say_what_they_are_about(deployment: dict, client: TestClient) -> None:
    evaluate_id, train_id = deployment["ids"]["evaluate"], deployment["ids"]["train"]
    page = client.get(f"/jobs/{evaluate_id}").text
    stored = dict(sql(deployment, select(Metric.name, Metric.value).where(Metric.job_id == evaluate_id)))
    assert stored["image_auroc"] > 0.5
    shown = dict(re.findall(r'data-metric="([^"]+)"><span class="name">[^<]*</span> <span class="n">([^<]*)</span>', page))
    assert set(shown) == set(stored) and float(shown["image_auroc"]) == pytest.approx(stored["image_auroc"], abs=1e-4)
    # Each card says what the image is (an evaluation's ground truth); no empty heat-map boxes
    # where heat maps were not asked for (--heatmaps none).
    flagged = flagged_ids(deployment, evaluate_id)[:24]
    labels = dict(sql(deployment, select(Result.id, Result.defect).where(Result.id.in_(flagged))))
    assert flagged and 'class="no-map"' not in page
    for result_id in flagged:
        card = re.search(rf'id="r{result_id}".*?</article>', page, re.DOTALL)
        assert card and f'href="/results/{result_id}"' in card.group(0)
        assert re.search(r'class="label label-(good|defective)">([^<]+)<', card.group(0)).group(2) in (
            labels[result_id], "good", "defective")
    train = client.get(f"/jobs/{train_id}").text
    synthetic = sql(deployment, select(Metric.value).where(Metric.job_id == train_id, Metric.name == "synthetic_auroc"))
    assert float(text_of(train, "synthetic-auroc")) == pytest.approx(synthetic[0][0], abs=1e-3)
    assert 'id="flagged"' not in train and 'id="precision"' not in train and "Nothing flagged" not in train
    assert text_of(train, "training-images").startswith(str(sql(deployment, select(Job.n_done).where(
        Job.id == train_id))[0][0]) + " read")


def test_a_result_opens_at_full_size_and_a_404_leads_back(deployment: dict, client: TestClient) -> None:
    score_id = deployment["ids"]["score"]
    result_id = flagged_ids(deployment, score_id)[0]
    page = client.get(f"/results/{result_id}").text
    assert f'src="/files/result/{result_id}"' in page and f'src="/files/heatmap/{result_id}"' in page
    assert f'href="/jobs/{score_id}#r{result_id}"' in page
    missing = client.get("/results/999999", headers={"Accept": "text/html"})
    assert missing.status_code == 404 and 'href="/" id="back"' in missing.text and "no result 999999" in missing.text
    assert client.get("/jobs/999999").text == "404: no job 999999"  # a script gets one line


def test_a_failed_training_shows_no_phase_counts_as_files(deployment: dict, client: TestClient) -> None:
    # A training that failed while calibrating 7 images left its phase's counts behind: not its files.
    with deployment["context"].store.session() as session:
        failed = Job(kind=JobKind.TRAIN, status=JobStatus.FAILED, source="/x", params={}, n_total=7, n_done=0,
                     error="the threshold is outside ...")
        session.add(failed)
    try:
        row = cells(client.get("/").text, f'data-job-id="{failed.id}"')
        assert row[4] == "—" and row[5] == "—"
        page = client.get(f"/jobs/{failed.id}").text
        assert text_of(page, "training-images") == "nothing registered" and "/ 7 files" not in page
        train_row = cells(client.get("/").text, f'data-job-id="{deployment["ids"]["train"]}"')
        assert train_row[4].endswith(" images")
    finally:
        with deployment["context"].store.session() as session:
            session.execute(Job.__table__.delete().where(Job.id == failed.id))
