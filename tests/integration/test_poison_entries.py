"""Malformed entries on a queue no worker reads: the reconciler's look into the queue skips them,
`adqueue reconcile` exits 0 and counts what workers moved aside. (Workers meeting them for real,
two of them while a job runs, is the `poison` scenario of benchmarks/chaos.py.)"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis

from adqueue.core.config import Settings
from adqueue.workers.producer import CeleryDispatcher
from adqueue.workers.transport import dead_letter_list
from benchmarks.harness.cli import cli_env, run_cli

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
