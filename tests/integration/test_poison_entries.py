"""Malformed entries on a queue no worker reads: the reconciler's look into the queue skips them,
`adqueue reconcile` exits 0 and counts what workers moved aside. (Workers meeting them for real,
two of them while a job runs, is the `poison` scenario of benchmarks/chaos.py.) And a worker that
does stop on an unrecoverable error exits non-zero, for its supervisor to restart it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from adqueue.core.config import Settings
from adqueue.workers.producer import CeleryDispatcher
from adqueue.workers.transport import dead_letter_list
from benchmarks.harness.cli import cli_env, run_cli
from benchmarks.harness.servers import REPO

pytestmark = pytest.mark.integration

MALFORMED = ["[1,2,3]", "this is not json", '{"headers": "nope"}', '{"body": 1}']


def test_the_look_into_the_queue_skips_what_it_cannot_parse(tmp_path: Path, redis_url: str) -> None:
    queue = f"poison-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(redis_url)
    for entry in MALFORMED:
        client.lpush(queue, entry)
    client.hset("unacked", f"tag-{queue}", "not json either")
    client.lpush(dead_letter_list(queue), "[1,2,3]")
    try:
        dispatcher = CeleryDispatcher(Settings.load(data_dir=tmp_path / "data", broker_url=redis_url, queue=queue))
        assert dispatcher.message_count() == len(MALFORMED)
        assert dispatcher.message_ids() == {"shard": set(), "train": set(), "finish": set()}
        assert dispatcher.dead_letters() == 1
        env = cli_env(ADQUEUE_DATA_DIR=str(tmp_path / "data"), ADQUEUE_BROKER_URL=redis_url, ADQUEUE_QUEUE=queue)
        run_cli(["db", "upgrade"], env)
        done = run_cli(["reconcile", "--format", "json"], env, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["dead_letters"] == 1
    finally:
        client.delete(queue, dead_letter_list(queue))
        client.hdel("unacked", f"tag-{queue}")


UNRECOVERABLE = """
import sys
from celery import bootsteps
from adqueue.core.config import Settings
from adqueue.workers.app import make_app, run_worker

class Broken(bootsteps.StartStopStep):
    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, consumer):
        raise RuntimeError("an unrecoverable error, on purpose")

app = make_app(Settings.load(data_dir=sys.argv[2], broker_url=sys.argv[1], queue="unrecoverable"))
app.steps["consumer"].add(Broken)
sys.exit(run_worker(app, ["worker", "--pool=solo", "--queues=unrecoverable", "--without-gossip",
                          "--without-mingle", "--loglevel=WARNING"]))
"""


def test_a_worker_stopped_by_an_unrecoverable_error_exits_non_zero(tmp_path: Path, redis_url: str) -> None:
    """Celery's worker_main() dropped the status (exit 0): a supervisor would not restart it."""
    done = subprocess.run([sys.executable, "-c", UNRECOVERABLE, redis_url, str(tmp_path / "data")], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=120, check=False)
    assert "Unrecoverable error" in done.stderr, done.stderr[-2000:]
    assert done.returncode == 1, done.stderr[-2000:]
