"""A real worker's Prometheus metrics, scraped while it scores a job, and a real Prometheus scraping it;
the same worker's notifications of job ends (its background notifier, beside the CLI's)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness.cli import FAST_MVG, run_cli, run_json
from benchmarks.harness.servers import free_port, wait_until
from tests.helpers.deployment import Deployment, make_deployment
from tests.helpers.receiver import Receiver, webhook_receiver

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory, redis_url: str,
            receiver: Receiver) -> Iterator[tuple[Deployment, int]]:
    folder = tmp_path_factory.mktemp("metrics")
    deployment = make_deployment("sqlite", folder, redis_url, f"sqlite:///{folder / 'adqueue.db'}",
                                 ADQUEUE_RECONCILE_INTERVAL="1", ADQUEUE_NOTIFY_URL=receiver.url)
    port = free_port()
    deployment.start_workers(1, ADQUEUE_METRICS_PORT=str(port))
    yield deployment, port
    deployment.stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, found), v in samples.items() if n == name and set(labels.items()) <= set(found))


def test_a_workers_metrics_during_a_job(metered: tuple[Deployment, int], textures, tmp_path: Path,
                                       receiver: Receiver) -> None:
    deployment, port = metered
    root, dump = textures
    run_json(["train", "--data", str(root), "--name", "bricks", *FAST_MVG, "--wait"], deployment.env)
    wait_until(lambda: scrape(port), 30, "the worker's metrics endpoint")
    night = tmp_path / "night"
    for copy in range(4):  # 72 files (8 unreadable) in 36 shards: a job long enough to watch
        shutil.copytree(dump, night / f"cam{copy}")
    job_id = int(run_cli(["score", "--model", "bricks", str(night), "--shard-size", "2", "--heatmaps", "none"],
                         deployment.env).stdout.split()[0])
    seen: list[float] = []
    status = "queued"
    database = Path(deployment.env["ADQUEUE_DATABASE_URL"].removeprefix("sqlite:///"))
    while status not in ("done", "failed", "cancelled"):
        seen.append(value(scrape(port), "adqueue_images_scored_total", model="bricks:1"))
        with sqlite3.connect(database) as connection:
            (status,) = connection.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        time.sleep(0.05)
    final = scrape(port)
    assert status == "done"
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # it rose while the job ran, never fell
    assert value(final, "adqueue_images_scored_total", model="bricks:1") == 64
    assert value(final, "adqueue_images_failed_total", model="bricks:1") == 8
    assert value(final, "adqueue_shard_runs_total", model="bricks:1", outcome="done") == 36
    assert value(final, "adqueue_shard_duration_seconds_count", model="bricks:1") == 36
    assert value(final, "adqueue_batch_duration_seconds_count", model="bricks:1") >= 36
    # Its end was sent by the worker's background notifier (no CLI followed this job): once.
    (post,) = receiver.wait_for(job_id)
    assert post["status"] == "done" and post["n_scored"] == 64 and post["n_errors"] == 8
    time.sleep(3)  # a few more reconciler passes and notifier wake-ups: still one
    assert len(receiver.of_job(job_id)) == 1
    (train_post,) = receiver.of_job(1)  # the training: its worker and the waiting CLI both noticed it
    assert train_post["kind"] == "train" and train_post["status"] == "done"
    assert ("adqueue_queue_depth", (("queue", deployment.env["ADQUEUE_QUEUE"]),)) in final
    print(f"images scored as scraped during job {job_id}: {seen}")


def test_a_real_prometheus_scrapes_the_worker(metered: tuple[Deployment, int], tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian: apt-get install prometheus)")
    deployment, port = metered
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: adqueue-workers
    static_configs:
      - targets: ["127.0.0.1:{port}"]
""")
    prometheus = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    try:
        def query(expression: str) -> list:
            url = f"http://127.0.0.1:{web_port}/api/v1/query?query={urllib.parse.quote(expression)}"
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())["data"]["result"]

        up = wait_until(lambda: query('up{job="adqueue-workers"} == 1'), 60, "prometheus scraping the worker", 0.5)
        assert up
        queue = deployment.env["ADQUEUE_QUEUE"]
        depth = wait_until(lambda: query(f'adqueue_queue_depth{{queue="{queue}"}}'), 30, "the queue depth", 0.5)
        assert float(depth[0]["value"][1]) == 0  # nothing waits
        # After the job of the test above (module order), its images are in Prometheus too.
        scored = query('sum(adqueue_images_scored_total{model="bricks:1"})')
        assert scored and float(scored[0]["value"][1]) == 64
    finally:
        prometheus.terminate()
        prometheus.wait(20)
