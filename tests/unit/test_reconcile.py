"""One reconciler pass on SQLite: what it takes back, gives up, stops and ends (sending nothing:
the broker side is tested against a real redis-server in tests/integration/test_reconciler.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from adqueue.core.clock import utcnow
from adqueue.core.config import Settings
from adqueue.jobs.context import Context
from adqueue.jobs.reconcile import reconcile
from adqueue.store.models import Job, JobStatus, Result, Run, Shard
from adqueue.store.transitions import complete_shard
from tests.helpers.store import LEASE, claim, job_with_shards


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    settings = Settings.load(data_dir=tmp_path, broker_url="")
    return Context(settings.with_overrides(max_attempts=2, lease_s=LEASE.total_seconds()))


def _later(seconds: float) -> timedelta:
    return LEASE + timedelta(seconds=seconds)


def test_a_dead_workers_shard_is_queued_again_then_given_up(ctx: Context) -> None:
    job_id, (a, b) = job_with_shards(ctx.store)
    claim(ctx.store, a, "lost-1")
    claim(ctx.store, b, "alive")
    now = utcnow() + _later(1)
    with ctx.store.session() as session:  # b's worker renews; a's is gone
        session.execute(Shard.__table__.update().where(Shard.id == b).values(lease_expires_at=now + LEASE))
    report = reconcile(ctx, {}, worker="r", now=now)
    assert report.shards_requeued == 1 and report.shards_given_up == 0
    with ctx.store.session() as session:
        shard = session.get_one(Shard, a)
        assert shard.status == "queued" and shard.enqueued_at is None and shard.run_id is None  # owed a message
        assert session.get_one(Shard, b).status == "running"
    claim(ctx.store, a, "lost-2", at=_later(2))  # the second attempt's worker dies too
    report = reconcile(ctx, {}, worker="r", now=utcnow() + _later(2) + _later(1))
    assert report.shards_given_up == 1
    with ctx.store.session() as session:
        shard = session.get_one(Shard, a)
        assert shard.status == "failed" and "lost on each of 2 attempt(s)" in shard.error
        rows = session.scalars(select(Result).where(Result.shard_id == a)).all()
        assert len(rows) == 2 and all(r.error.startswith("shard failed:") for r in rows)
        assert session.get_one(Job, job_id).n_failed == 2
        outcomes = session.scalars(select(Run.outcome).where(Run.shard_id == a).order_by(Run.id)).all()
        assert outcomes == ["expired", "expired"]


def test_a_job_whose_last_worker_died_after_its_last_shard_is_ended(ctx: Context) -> None:
    job_id, (a,) = job_with_shards(ctx.store, 1)
    claimed = claim(ctx.store, a)
    with ctx.store.session() as session:
        complete_shard(session, claimed, [], n_ok=2, n_failed=0)  # ... and the worker dies here
    assert reconcile(ctx, {}, worker="r").jobs_ended == 1
    with ctx.store.session() as session:
        assert session.get_one(Job, job_id).status == JobStatus.DONE


def test_an_embedded_job_whose_process_died_is_marked_for_resume(ctx: Context) -> None:
    running_id, (a, _) = job_with_shards(ctx.store)
    idle_id, _ = job_with_shards(ctx.store)
    with ctx.store.session() as session:
        session.execute(Job.__table__.update().where(Job.id.in_([running_id, idle_id]))
                        .values(queue=None, heartbeat_at=utcnow()))
    claim(ctx.store, a, "inline-1")
    assert reconcile(ctx, {}, worker="r").embedded_stopped == 0  # leases live, activity recent
    report = reconcile(ctx, {}, worker="r", now=utcnow() + _later(1))
    assert report.embedded_stopped == 2
    with ctx.store.session() as session:
        for job_id in (running_id, idle_id):
            job = session.get_one(Job, job_id)
            assert job.status == JobStatus.FAILED and f"adqueue resume {job_id}" in job.error
        assert session.get_one(Shard, a).status == "queued"  # waits for resume


def test_an_embedded_job_resumed_long_after_it_stopped_is_not_stopped_again(ctx: Context) -> None:
    """`resume` reopens the job, then its process starts (imports, model) before claiming a shard:
    a reconciler passing in between must not take the reopened job for the long-dead one."""
    from adqueue.store.transitions import reopen_job

    job_id, (a, _) = job_with_shards(ctx.store)
    with ctx.store.session() as session:
        session.execute(Job.__table__.update().where(Job.id == job_id).values(queue=None, heartbeat_at=utcnow()))
    claim(ctx.store, a, "inline-1")
    hours_later = utcnow() + timedelta(hours=8)
    assert reconcile(ctx, {}, worker="r", now=hours_later).embedded_stopped == 1  # the process died
    with ctx.store.session() as session:
        assert reopen_job(session, job_id, queue=None, now=hours_later)  # the morning's `resume`
        session.commit()
    # a worker's reconciler passes before the resuming process has claimed anything
    assert reconcile(ctx, {}, worker="r", now=hours_later + timedelta(seconds=1)).embedded_stopped == 0
    with ctx.store.session() as session:
        assert session.get_one(Job, job_id).status in (JobStatus.QUEUED, JobStatus.RUNNING)
    # and one that never gets going is still stopped, a lease later
    assert reconcile(ctx, {}, worker="r", now=hours_later + _later(1)).embedded_stopped == 1


def test_work_with_a_live_lease_is_left_alone(ctx: Context) -> None:
    job_id, shard_ids = job_with_shards(ctx.store)
    for shard_id in shard_ids:
        claim(ctx.store, shard_id)
    report = reconcile(ctx, {}, worker="r")
    assert not any(report.as_dict().values())
    with ctx.store.session() as session:
        assert {s.status for s in session.scalars(select(Shard).where(Shard.job_id == job_id))} == {"running"}
