"""A signal that lands inside a PostgreSQL driver call still stops an embedded run for `resume`.

SQLAlchemy pings a pooled connection before each checkout (autocommit on, SELECT 1, autocommit
off in a `finally`). A SIGTERM in the middle of that SELECT raises Interrupted inside psycopg, and
the `finally` then fails with psycopg's own error, which replaces it: a CI run once ended such a
job with "database error: can't change 'autocommit' now" (exit 1, the job left `running`). Here
the ping is made to take a while (pg_sleep) and the signal is sent while PostgreSQL shows it
running, so the race happens every time.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from benchmarks.harness.cli import FAST_MVG
from benchmarks.harness.servers import create_database
from tests.helpers.cli import invoke_cli

pytestmark = pytest.mark.integration

SLOW_PING = "SELECT pg_sleep(20)"


def _libpq(url: str) -> str:
    rest = url.split("://", 1)[1]
    user_host, dbname = rest.rsplit("/", 1)
    user, host_port = user_host.split("@", 1)
    host, port = host_port.rsplit(":", 1)
    return f"host={host} port={port} user={user} dbname={dbname}"


@contextmanager
def sigterm_during_a_ping(url: str, monkeypatch: pytest.MonkeyPatch, after_done_shards: int) -> Iterator[list[str]]:
    """Once `after_done_shards` shards are done, the pool's next ping sleeps in PostgreSQL and this
    process gets SIGTERM while PostgreSQL shows that ping active. Yields a list that gets what
    happened ("sent", or an error)."""
    ping = {"sql": "SELECT 1"}
    monkeypatch.setattr(PGDialect_psycopg, "_dialect_specific_select_one", property(lambda _self: ping["sql"]))
    events: list[str] = []
    main = threading.main_thread().ident
    assert main is not None

    def watch() -> None:
        try:
            with psycopg.connect(_libpq(url), autocommit=True) as conn:
                deadline = time.monotonic() + 120
                while conn.execute("SELECT count(*) FROM shards WHERE status = 'done'").fetchone()[0] < after_done_shards:
                    assert time.monotonic() < deadline, "no shard done in 120 s"
                    time.sleep(0.01)
                ping["sql"] = SLOW_PING
                while not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = %s",
                                       (SLOW_PING,)).fetchone()[0]:
                    assert time.monotonic() < deadline, "no ping in 120 s"
                    time.sleep(0.01)
                ping["sql"] = "SELECT 1"  # the pings after this one (marking the job) are quick again
                signal.pthread_kill(main, signal.SIGTERM)
                events.append("sent")
        except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
            events.append(f"watcher failed: {exc!r}")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield events
    thread.join(timeout=5)


def test_sigterm_inside_the_pools_ping_marks_the_job_for_resume(postgres_url: str, textures, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url = create_database(postgres_url, f"sig_{uuid.uuid4().hex[:8]}")
    data = tmp_path / "data"
    env = {"ADQUEUE_DATABASE_URL": url}
    invoke_cli(data, "train", "--data", str(textures[0]), "--name", "m", *FAST_MVG, **env)
    dump = tmp_path / "dump"
    dump.mkdir()
    images = sorted(p for p in textures[1].glob("*.png") if "corrupt" not in p.name)
    for index in range(120):
        os.link(images[index % len(images)], dump / f"img_{index:04d}.png")

    with sigterm_during_a_ping(url, monkeypatch, after_done_shards=2) as events:
        stopped = invoke_cli(data, "score", "--model", "m", str(dump), "--shard-size", "10", "--heatmaps", "none",
                             ok=False, **env)
    assert events == ["sent"], events
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.stderr
    resume = re.search(r"stopped by SIGTERM; `adqueue resume (\d+)` completes job \1", stopped.stderr)
    assert resume, stopped.stderr
    job = resume.group(1)
    with psycopg.connect(_libpq(url)) as conn:
        status, error, done = conn.execute("SELECT status, error, n_done FROM jobs WHERE id = %s", (job,)).fetchone()
        running = conn.execute("SELECT count(*) FROM shards WHERE job_id = %s AND status = 'running'",
                               (job,)).fetchone()[0]
    assert (status, running) == ("failed", 0) and f"adqueue resume {job}" in error and 0 < done < 120, (status, error)

    invoke_cli(data, "resume", job, **env)
    with psycopg.connect(_libpq(url)) as conn:
        status, rows, distinct = conn.execute(
            "SELECT j.status, count(r.id), count(DISTINCT r.path) FROM jobs j JOIN results r ON r.job_id = j.id "
            "WHERE j.id = %s GROUP BY j.status", (job,)).fetchone()
    assert (status, rows, distinct) == ("done", 120, 120)
