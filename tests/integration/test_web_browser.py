"""`adqueue serve` as a real process, driven by a real headless Chromium (Debian's, via Playwright).

Trains and scores the embedded default into a data dir, starts the server with a token on a free
port, and reviews the job as a person would: every flagged image on every page, a heat map that
loads, a review click that moves the precision, a card opened at full size, an evaluation's and a
training's page, a 404 with its way back. ADQUEUE_UPDATE_SCREENSHOT=1 also writes the screenshots
of a score, an evaluate and a train job page to docs/ (the README shows them); otherwise they go
to a temp dir.
"""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from adqueue.core.config import sqlite_url
from adqueue.store.models import Metric, Result, Review
from adqueue.store.session import Store
from benchmarks.harness.cli import FAST_MVG, cli_env
from benchmarks.harness.servers import REPO, free_port, missing, wait_until
from tests.helpers.cli import invoke_cli

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "browser-test-token"
PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, textures) -> Iterator[dict]:
    if not CHROMIUM.exists():
        missing("chromium (/usr/bin/chromium)")
    try:
        import playwright.sync_api  # noqa: F401 - only whether it imports
    except ImportError:
        message = "playwright is not installed: pip install -e '.[dev]' (it drives /usr/bin/chromium; no browser download)"
        pytest.fail(message) if os.environ.get("ADQUEUE_REQUIRE_SERVERS") == "1" else pytest.skip(message)
    root, dump = textures
    data_dir = tmp_path_factory.mktemp("serve")
    train_id = int(invoke_cli(data_dir, "train", "--data", str(root), "--name", "bricks", *FAST_MVG).stdout.split()[0])
    job_id = int(invoke_cli(data_dir, "score", "--model", "bricks", str(dump)).stdout.split()[0])
    evaluate_id = int(invoke_cli(data_dir, "evaluate", "--model", "bricks", "--data", str(root),
                                 "--heatmaps", "flagged").stdout.split()[0])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(data_dir / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "adqueue", "serve", "--port", str(port)], cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT,
            env=cli_env(ADQUEUE_DATA_DIR=str(data_dir), ADQUEUE_BROKER_URL="", ADQUEUE_SERVE_TOKEN=TOKEN),
        )

        def up() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"adqueue serve exited: {(data_dir / 'serve.log').read_text()[-2000:]}")
            request = urllib.request.Request(f"{base}/", headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(request, timeout=2) as reply:
                return reply.status == 200

        try:
            wait_until(up, 60, "adqueue serve", interval=0.25)
            yield {"base": base, "port": port, "job_id": job_id, "train_id": train_id, "evaluate_id": evaluate_id,
                   "store": Store(sqlite_url(data_dir / "adqueue.db"))}
        finally:
            server.terminate()
            server.wait(20)


def flagged_count(store: Store, job_id: int) -> int:
    with store.session() as session:
        return int(session.scalar(select(func.count()).select_from(Result)
                                  .where(Result.job_id == job_id, Result.is_anomaly.is_(True))))


def test_a_reviewer_walks_through_the_job_page(served: dict, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    base, job_id, store = served["base"], served["job_id"], served["store"]
    expected = flagged_count(store, job_id)
    assert expected > 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/jobs/{job_id}?token={TOKEN}")  # once: then the cookie
            assert page.url == f"{base}/jobs/{job_id}"
            assert page.locator("#flagged-count").inner_text() == str(expected)
            # Every flagged image, over every page.
            shown = page.locator("article.flagged-image").count()
            while page.locator("#flagged a[rel=next]").count():
                page.locator("#flagged a[rel=next]").first.click()
                page.wait_for_load_state()
                shown += page.locator("article.flagged-image").count()
            assert shown == expected
            page.goto(f"{base}/jobs/{job_id}")
            first = page.locator("article.flagged-image").first
            result_id = first.get_attribute("data-result-id")
            heatmap = page.request.get(f"{base}/files/heatmap/{result_id}")
            assert heatmap.status == 200 and heatmap.body().startswith(JPEG)
            assert heatmap.headers["x-content-type-options"] == "nosniff"
            first.locator("img.heatmap").scroll_into_view_if_needed()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                   arg=first.locator("img.heatmap").element_handle())
            # Who reviews (a cookie), then a review click that changes the precision shown.
            page.locator("form.reviewer input[name=reviewer]").fill("night-shift QA")
            page.locator("form.reviewer button").click()
            page.wait_for_load_state()
            assert page.locator("#precision").inner_text() == "—"
            page.locator(f"#r{result_id}").get_by_role("button", name="defect").click()
            page.wait_for_load_state()
            assert page.locator("#precision").inner_text() == "100.0%"
            assert "night-shift QA" in page.locator(f"#r{result_id} .meta").inner_text()
            if expected > 1:
                page.locator("article.flagged-image").nth(1).get_by_role("button", name="false alarm").click()
                page.wait_for_load_state()
                assert page.locator("#precision").inner_text() == "50.0%"
            with store.session() as session:
                assert session.scalar(select(func.count()).select_from(Review)) == min(expected, 2)
            page.goto(f"{base}/jobs/{job_id}")
            page.wait_for_load_state("networkidle")
            shot = tmp_path / "job-page.png"
            page.screenshot(path=str(shot))  # the viewport: 1280x900
        finally:
            browser.close()
    keep_screenshot(shot, "job-page.png")


def keep_screenshot(shot: Path, name: str) -> None:
    assert shot.read_bytes().startswith(PNG)
    if os.environ.get("ADQUEUE_UPDATE_SCREENSHOT") == "1":  # 256 colors: a third of the bytes, same look
        from PIL import Image

        with Image.open(shot) as image:
            small = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        small.save(REPO / "docs" / name, optimize=True)


def test_cards_open_evaluations_and_trainings_show_what_they_are_about(served: dict, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    base, store = served["base"], served["store"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/jobs/{served['job_id']}?token={TOKEN}")
            # A thumbnail opens the image at full size beside its heat map, and leads back.
            first = page.locator("article.flagged-image").first
            result_id = first.get_attribute("data-result-id")
            first.locator("a.open").click()
            page.wait_for_load_state("networkidle")
            assert page.url == f"{base}/results/{result_id}"
            for image in ("#full-image", "#full-heatmap"):
                assert page.evaluate("sel => document.querySelector(sel).naturalWidth", image) > 0
            shown = page.evaluate("() => document.querySelector('#full-image').getBoundingClientRect().width")
            assert shown > 400  # several times the ~130 px of a card
            page.locator("#back").click()
            page.wait_for_load_state()
            assert page.url.startswith(f"{base}/jobs/{served['job_id']}")

            # An evaluation: its metrics, and what each flagged image really is.
            page.goto(f"{base}/jobs/{served['evaluate_id']}")
            page.wait_for_load_state("networkidle")
            with store.session() as session:
                auroc = session.scalar(select(Metric.value).where(Metric.job_id == served["evaluate_id"],
                                                                  Metric.name == "image_auroc"))
            shown_auroc = page.locator('#metrics [data-metric="image_auroc"] .n').inner_text()
            assert float(shown_auroc) == pytest.approx(auroc, abs=1e-4)
            cards = page.locator("article.flagged-image")
            assert cards.count() > 0 and page.locator("article.flagged-image .label").count() == cards.count()
            shot = tmp_path / "evaluate-page.png"
            page.screenshot(path=str(shot))
            keep_screenshot(shot, "evaluate-page.png")

            # A training: its self-check and warnings, no score-only sections.
            page.goto(f"{base}/jobs/{served['train_id']}")
            page.wait_for_load_state("networkidle")
            assert float(page.locator("#synthetic-auroc").inner_text()) > 0
            assert page.locator("#flagged").count() == 0 and page.locator("#precision").count() == 0
            assert page.locator("#warnings li").count() >= 1  # 24 images: calibrated on only 5
            shot = tmp_path / "train-page.png"
            page.screenshot(path=str(shot))
            keep_screenshot(shot, "train-page.png")

            # A page that is not there says so, with the way back.
            reply = page.goto(f"{base}/jobs/999999")
            assert reply is not None and reply.status == 404
            page.locator("#back").click()
            page.wait_for_load_state()
            assert page.url == f"{base}/"
        finally:
            browser.close()


def test_the_real_server_reads_no_path(served: dict) -> None:
    """Raw request lines, as a hostile client sends them (no URL normalization on the way)."""
    for raw in ("/files/result/../../../../etc/passwd", "/files/result/%2e%2e/%2e%2e/etc/passwd",
                "/files/heatmap/..%2f..%2f..%2fetc%2fpasswd", "//etc/passwd", "/static/../../../etc/passwd",
                "/files/result/1/../../../../../etc/passwd"):
        connection = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=10)
        connection.putrequest("GET", raw, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        connection.endheaders()
        reply = connection.getresponse()
        body = reply.read()
        connection.close()
        assert reply.status in (403, 404) and b"root:" not in body, raw
    # Without the token: nothing at all.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{served['base']}/jobs/{served['job_id']}", timeout=10)
    assert refused.value.code == 401
    assert re.search(rb"token", refused.value.read())
