"""The reconciler and `--wait` against a real redis-server: lost messages are sent again exactly
once, messages still waiting are left alone, reconcilers racing each other send nothing twice,
a training whose worker dies runs again, and `--wait` gives up when nothing can move."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from adqueue.core.config import Settings
from adqueue.jobs.context import Context
from adqueue.jobs.control import cancel_job
from adqueue.jobs.reconcile import reconcile
from adqueue.jobs.submit import submit_score
from adqueue.store.models import Job, JobStatus, Run, Shard
from adqueue.workers.producer import CeleryDispatcher
from benchmarks.harness.cli import FAST_MVG, run_cli, run_json
from benchmarks.harness.servers import wait_until
from tests.helpers.deployment import database_for, make_deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str, textures,
            ) -> Iterator[tuple[Context, CeleryDispatcher]]:
    """A database with a trained model, and a dispatcher to a queue no worker reads."""
    folder = tmp_path_factory.mktemp(f"reconciler-{request.param}")
    database = database_for(request, request.param, folder)
    deployment = make_deployment(request.param, folder, redis_url, database)
    run_cli(["train", "--data", str(textures[0]), "--name", "m", *FAST_MVG], deployment.embedded_env())
    settings = Settings.load(data_dir=deployment.env["ADQUEUE_DATA_DIR"], database_url=database,
                             broker_url=redis_url, queue=deployment.env["ADQUEUE_QUEUE"])
    ctx = Context(settings.with_overrides(reconcile_interval_s=0.5))
    yield ctx, CeleryDispatcher(ctx.settings)
    ctx.close()


@pytest.fixture
def queued(trained: tuple[Context, CeleryDispatcher], textures) -> tuple[Context, CeleryDispatcher, int]:
    """A score job of 9 shards, sent."""
    ctx, outbox = trained
    with ctx.store.session() as session:  # the previous test's job is not this test's business
        active = session.scalars(select(Job.id).where(Job.status.in_(JobStatus.ACTIVE))).all()
    for job_id in active:
        cancel_job(ctx, job_id)
    redis.Redis.from_url(outbox.settings.broker_url or "").delete(outbox.queue)
    job = submit_score(ctx, outbox, model="m", data=str(textures[1]), shard_size=2)
    return ctx, outbox, job.job_id


def _shard_ids(ctx: Context, job_id: int) -> list[int]:
    with ctx.store.session() as session:
        return list(session.scalars(select(Shard.id).where(Shard.job_id == job_id).order_by(Shard.seq)))


def _in_queue(outbox: CeleryDispatcher) -> list[int]:
    client = redis.Redis.from_url(outbox.settings.broker_url or "")
    import base64
    import json

    return sorted(json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] for raw in client.lrange(outbox.queue, 0, -1))


def test_lost_messages_are_sent_again_once_and_waiting_ones_are_left_alone(queued: tuple) -> None:
    ctx, outbox, job_id = queued
    shards = _shard_ids(ctx, job_id)
    assert len(shards) == 9 and _in_queue(outbox) == shards and outbox.message_count() == 9
    client = redis.Redis.from_url(outbox.settings.broker_url or "")
    for raw in client.lrange(outbox.queue, 0, 2):  # three messages vanish (say, Redis lost them)
        client.lrem(outbox.queue, 1, raw)
    lost = sorted(set(shards) - set(_in_queue(outbox)))
    assert len(lost) == 3
    with ctx.store.session() as session:
        sent = max(session.scalars(select(Shard.enqueued_at).where(Shard.job_id == job_id)))
    sent = sent if sent.tzinfo else sent.replace(tzinfo=UTC)
    # Within 2 reconcile intervals of sending, a message may still be on its way: nothing is resent.
    report = reconcile(ctx, {outbox.queue: outbox}, worker="test", now=sent + timedelta(seconds=0.5))
    assert report.messages_resent == 0
    report = reconcile(ctx, {outbox.queue: outbox}, worker="test", now=sent + timedelta(seconds=1.5))
    assert report.messages_resent == 3 and _in_queue(outbox) == shards  # each lost one once, no duplicates
    assert reconcile(ctx, {outbox.queue: outbox}, worker="test").messages_resent == 0


def test_racing_reconcilers_send_each_lost_message_once(queued: tuple) -> None:
    ctx, outbox, job_id = queued
    redis.Redis.from_url(outbox.settings.broker_url or "").delete(outbox.queue)  # the whole queue is lost
    time.sleep(1.2)
    barrier = threading.Barrier(4)
    sent: list[int] = []

    def reconciler(index: int) -> None:
        own = CeleryDispatcher(outbox.settings)
        barrier.wait()
        sent.append(reconcile(ctx, {own.queue: own}, worker=f"r{index}").messages_resent)

    threads = [threading.Thread(target=reconciler, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(sent) == 9 and _in_queue(outbox) == _shard_ids(ctx, job_id)


def test_wait_gives_up_when_nothing_can_move(tmp_path: Path, redis_url: str, textures) -> None:
    deployment = make_deployment("sqlite", tmp_path, redis_url, f"sqlite:///{tmp_path / 'w.db'}",
                                 ADQUEUE_STALL_TIMEOUT="3")
    root, dump = textures
    run_cli(["train", "--data", str(root), "--name", "m", *FAST_MVG], deployment.embedded_env())
    started = time.monotonic()
    done = run_cli(["score", "--model", "m", str(dump), "--wait"], deployment.env, check=False, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]  # no worker: it says so instead of waiting forever
    message = done.stderr.strip().splitlines()[-1]
    job_id = int(done.stdout.split()[0])
    assert "made no progress" in message and f"adqueue resume {job_id}" in message
    assert time.monotonic() - started < 60


def test_a_training_whose_worker_is_killed_runs_again(tmp_path: Path, redis_url: str, textures) -> None:
    deployment = make_deployment("sqlite", tmp_path, redis_url, f"sqlite:///{tmp_path / 't.db'}",
                                 ADQUEUE_LEASE="4", ADQUEUE_RECONCILE_INTERVAL="1")
    try:
        (first,) = deployment.start_workers(1)
        root, _ = textures
        slow = ["--set", "image_size=32", "--set", "ae_epochs=400", "--set", "flow_epochs=1"]
        job = run_json(["train", "--detector", "encoder_flow", "--data", str(root), "--name", "ef", *slow],
                       deployment.env)
        ctx = Context(Settings.load(data_dir=deployment.env["ADQUEUE_DATA_DIR"],
                                    database_url=deployment.env["ADQUEUE_DATABASE_URL"], broker_url=""))

        def phase() -> str:
            with ctx.store.session() as session:
                return str(session.get_one(Job, job["job_id"], populate_existing=True).phase)

        wait_until(lambda: phase().startswith("training autoencoder"), 120, "training to start", interval=0.2)
        first.kill()  # as the OOM killer would
        deployment.start_workers(1)
        wait_until(lambda: run_json(["jobs", str(job["job_id"])], deployment.env)["status"] in ("done", "failed"),
                   300, "the training to end", interval=1)
        summary = run_json(["jobs", str(job["job_id"])], deployment.env)
        assert summary["status"] == "done" and summary["model"] == "ef:1" and summary["attempts"] == 2
        with ctx.store.session() as session:
            outcomes = sorted(session.scalars(select(Run.outcome).where(Run.job_id == job["job_id"], Run.kind == "train")))
        assert outcomes == ["done", "expired"]
    finally:
        deployment.stop()
