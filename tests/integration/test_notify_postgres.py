"""The notification outbox on PostgreSQL: racing senders send a job's end once, its alarms and counts
are stored, and serve's /metrics reads them back."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from adqueue.core.clock import utcnow
from adqueue.core.config import Settings
from adqueue.jobs.context import Context
from adqueue.jobs.notify import notify_owed
from adqueue.jobs.reconcile import reconcile
from adqueue.store.notifications import outcome_fields
from adqueue.store.transitions import complete_shard
from adqueue.web.metrics import exposition, metrics_registry
from benchmarks.harness.servers import create_database
from tests.helpers.receiver import webhook_receiver
from tests.helpers.store import claim, job_with_shards

pytestmark = pytest.mark.integration


def test_racing_senders_notify_once_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    database = create_database(postgres_url, f"adq_{uuid.uuid4().hex[:10]}")
    with webhook_receiver() as receiver:
        settings = Settings.load(data_dir=tmp_path, database_url=database, broker_url="").with_overrides(
            notify_urls=(receiver.url,))
        ctx = Context(settings)
        job_id, (shard,) = job_with_shards(ctx.store, 1)
        claimed = claim(ctx.store, shard)
        rows = [{"path": path, "score": 2.0, "is_anomaly": True, "scored_at": utcnow()} for path, *_ in claimed.items]
        with ctx.store.session() as session:
            complete_shard(session, claimed, rows, n_ok=2, n_failed=0)  # ... and the worker dies here
        assert reconcile(ctx, {}, worker="r").jobs_ended == 1
        senders = [threading.Thread(target=notify_owed, args=(Context(settings),)) for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        (post,) = receiver.of_job(job_id)
        assert post["status"] == "done" and post["n_flagged"] == 2 and post["anomaly_rate"] == 1.0
        with ctx.store.session() as session:
            assert outcome_fields(session, job_id)["n_flagged"] == 2
        text = exposition(metrics_registry(ctx.store)).decode()
        assert 'adqueue_model_flagged{model="' in text and "} 2.0" in text
