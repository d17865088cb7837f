"""The SQL store on SQLite: schema parity with the migration, idempotent writes, and the state
machine's guards (leases with fencing, cancel, resume)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select

from adqueue.store.migrate import ensure_schema, head_revision
from adqueue.store.models import (
    Base,
    Job,
    JobStatus,
    Model,
    Result,
    Run,
    RunOutcome,
    Shard,
    ShardStatus,
    utcnow,
)
from adqueue.store.results import upsert_results
from adqueue.store.session import Store
from adqueue.store.transitions import (
    ClaimedJob,
    ClaimedShard,
    add_shards,
    cancel_job,
    close_if_complete,
    complete_shard,
    create_job,
    end_submission,
    interrupt_job,
    release_shard,
    renew_shard_lease,
    reopen_job,
)
from tests.helpers.store import LEASE, claim, job_with_shards, rows


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    assert ensure_schema(store) is True
    return store


def test_migration_matches_the_orm_and_is_idempotent(store: Store) -> None:
    assert ensure_schema(store) is False
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []


def test_sqlite_runs_in_wal_mode(store: Store) -> None:
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30000


def test_a_second_delivery_of_a_held_shard_claims_nothing_and_costs_no_attempt(store: Store) -> None:
    _, (shard_id, _) = job_with_shards(store)
    first = claim(store, shard_id, "w1")
    assert first is not None and first.attempts == 1
    assert claim(store, shard_id, "w2") is None  # the lease is live: a duplicate message runs nothing
    with store.session() as session:
        shard = session.get_one(Shard, shard_id)
        assert shard.attempts == 1 and shard.worker == "w1" and shard.run_id == first.run_id


def test_a_run_that_lost_its_lease_writes_nothing(store: Store) -> None:
    job_id, (shard_id, _) = job_with_shards(store)
    stale = claim(store, shard_id, "w1")
    live = claim(store, shard_id, "w2", at=LEASE * 2)  # w1 stopped renewing; its lease ran out
    assert stale is not None and live is not None and live.attempts == 2 and live.run_id != stale.run_id
    with store.session() as session:
        assert renew_shard_lease(session, shard_id, stale.run_id, utcnow() + LEASE) is False
        assert release_shard(session, stale, "boom", retry_at=None) is False  # cannot requeue w2's shard
        assert complete_shard(session, stale, rows(stale, 5.0), n_ok=2, n_failed=0) is False
    with store.session() as session:
        assert session.get_one(Shard, shard_id).status == ShardStatus.RUNNING
        assert session.scalar(select(func.count()).select_from(Result)) == 0  # the stale copy wrote no row
        assert complete_shard(session, live, rows(live, 0.5), n_ok=2, n_failed=0) is True
    with store.session() as session:
        written = session.scalars(select(Result).where(Result.job_id == job_id)).all()
        assert {r.run_id for r in written} == {live.run_id} and {r.score for r in written} == {0.5}
        assert session.get_one(Job, job_id).n_done == 2
        outcomes = dict(session.execute(select(Run.id, Run.outcome)).all())
        assert outcomes[stale.run_id] == RunOutcome.EXPIRED and outcomes[live.run_id] == RunOutcome.DONE


def test_concurrent_claims_of_one_shard_have_one_winner(store: Store) -> None:
    _, (shard_id, _) = job_with_shards(store)
    barrier = threading.Barrier(6)
    won: list[ClaimedShard | None] = []

    def contender(index: int) -> None:
        barrier.wait()
        won.append(claim(store, shard_id, f"w{index}"))

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(c is not None for c in won) == 1
    with store.session() as session:
        assert session.get_one(Shard, shard_id).attempts == 1
        assert session.scalar(select(func.count()).select_from(Run)) == 1


def test_the_job_ends_once_when_all_shards_are_closed(store: Store) -> None:
    job_id, shard_ids = job_with_shards(store)
    claimed = [claim(store, s) for s in shard_ids]
    with store.session() as session:
        complete_shard(session, claimed[0], rows(claimed[0], 1.0), n_ok=2, n_failed=0)
        assert close_if_complete(session, job_id) is None
    with store.session() as session:
        assert release_shard(session, claimed[1], "boom", retry_at=None) is True
        assert close_if_complete(session, job_id) is None
    again = claim(store, shard_ids[1])
    assert again is not None and again.attempts == 2
    with store.session() as session:
        complete_shard(session, again, [], n_ok=0, n_failed=2, status=ShardStatus.FAILED, error="boom")
    with store.session() as session:
        assert close_if_complete(session, job_id) == JobStatus.FAILED
    with store.session() as session:
        assert close_if_complete(session, job_id) is None
        job = session.get_one(Job, job_id)
        assert job.n_done == 2 and job.n_failed == 2 and "1 shard(s) failed after 2 attempt(s)" in job.error


def test_cancel_stops_held_runs_and_resume_runs_only_what_is_not_done(store: Store) -> None:
    job_id, (a, b, c) = job_with_shards(store, 3)
    done, running = claim(store, a), claim(store, b)
    with store.session() as session:
        complete_shard(session, done, rows(done, 1.0), n_ok=2, n_failed=0)
    with store.session() as session:
        assert cancel_job(session, job_id, "cancelled")
    with store.session() as session:
        assert renew_shard_lease(session, b, running.run_id, utcnow() + LEASE) is False  # stops at its next batch
        assert complete_shard(session, running, rows(running, 1.0), n_ok=2, n_failed=0) is False
        statuses = dict(session.execute(select(Shard.id, Shard.status).where(Shard.job_id == job_id)).all())
        assert statuses == {a: "done", b: "cancelled", c: "cancelled"}
        assert session.get_one(Job, job_id).status == JobStatus.CANCELLED
    assert claim(store, c) is None  # a cancelled shard's message runs nothing
    with store.session() as session:
        assert reopen_job(session, job_id, queue="q") is True
    with store.session() as session:
        statuses = dict(session.execute(select(Shard.id, Shard.status).where(Shard.job_id == job_id)).all())
        assert statuses == {a: "done", b: "queued", c: "queued"}
        job = session.get_one(Job, job_id)
        assert job.status == JobStatus.RUNNING and job.n_done == 2 and job.error is None
        assert session.scalars(select(Shard.enqueued_at).where(Shard.id.in_([b, c]))).all() == [None, None]


def test_resume_gives_failed_shards_a_fresh_budget_and_takes_their_counts_back(store: Store) -> None:
    job_id, (a, _) = job_with_shards(store, 2)
    failed = claim(store, a)
    with store.session() as session:
        complete_shard(session, failed, [{**r, "error": "x", "score": None} for r in rows(failed, 0)],
                       n_ok=0, n_failed=2, status=ShardStatus.FAILED, error="x")
    with store.session() as session:
        assert session.get_one(Job, job_id).n_failed == 2
        assert reopen_job(session, job_id, queue="q")
    with store.session() as session:
        shard = session.get_one(Shard, a)
        assert shard.status == ShardStatus.QUEUED and shard.attempts == 0 and shard.n_failed == 0
        assert session.get_one(Job, job_id).n_failed == 0


def test_a_stopped_process_gives_its_attempt_back(store: Store) -> None:
    job_id, (a, _b) = job_with_shards(store, 2)
    claim(store, a)
    with store.session() as session:
        interrupt_job(session, job_id, "interrupted")
    with store.session() as session:
        shards = session.scalars(select(Shard).where(Shard.job_id == job_id).order_by(Shard.seq)).all()
        assert [(s.status, s.attempts) for s in shards] == [("queued", 0), ("queued", 0)]
        assert session.scalar(select(Run.outcome)) == RunOutcome.INTERRUPTED


def test_results_are_unique_per_job_and_path(store: Store) -> None:
    job_id, (first, second) = job_with_shards(store)
    base = [{"job_id": job_id, "shard_id": first, "path": f"/d/{k}.png", "score": 1.0, "scored_at": utcnow()}
            for k in "ab"]
    with store.session() as session:
        upsert_results(session, base + [{**r, "path": r["path"] + "2", "shard_id": second} for r in base])
        upsert_results(session, [{**r, "score": 3.0} for r in base])
        assert session.scalar(select(func.count()).select_from(Result)) == 4
        assert sorted(session.scalars(select(Result.score))) == [1.0, 1.0, 3.0, 3.0]



def test_a_store_opened_while_another_process_creates_the_file_waits_for_it(tmp_path: Path) -> None:
    """Workers started together on a new data dir: one is still writing the new file's first
    transaction (not yet in WAL mode) when the next one connects. SQLite refuses that one's switch
    to WAL at once, without its busy timeout; it must wait for the lock like any other, not exit
    with "database is locked" (as a worker did in CI)."""
    path = tmp_path / "adqueue.db"
    creator = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    creator.execute("BEGIN IMMEDIATE")
    creator.execute("CREATE TABLE first_write (x)")
    release = threading.Timer(0.5, lambda: creator.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    store = Store(f"sqlite:///{path}")
    store.check_reachable()
    waited = time.monotonic() - started
    release.join()
    creator.close()
    assert waited >= 0.4
    ensure_schema(store)
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def _submission(store: Store) -> tuple[ClaimedJob, list[int]]:
    with store.session() as session:
        model = Model(name="started", version=1, detector="mvg", params={}, artifact_path="x", threshold=1.0)
        session.add(model)
        session.flush()
        held = create_job(session, kind="score", source="/d", params={}, model_id=model.id, queue="q",
                          worker="submitter", lease_until=utcnow() + LEASE)
    with store.session() as session:
        ids = add_shards(session, held, 0, [[["/d/a.png", None, None, None]], [["/d/b.png", None, None, None]]],
                         lease_until=utcnow() + LEASE)
    assert ids is not None
    return held, ids


def test_started_at_is_set_by_a_claim_made_while_the_submission_still_runs(store: Store) -> None:
    held, (first, _second) = _submission(store)
    claimed = claim(store, first)
    assert claimed is not None
    with store.session() as session:
        job = session.get_one(Job, held.job_id)
        assert (job.status, job.started_at is not None) == (JobStatus.SUBMITTING, True)
        claimed_at = job.started_at
    with store.session() as session:
        assert end_submission(session, held)
    with store.session() as session:
        job = session.get_one(Job, held.job_id, populate_existing=True)
        assert (job.status, job.started_at) == (JobStatus.RUNNING, claimed_at)  # the first claim came first


def test_started_at_is_set_at_the_end_of_a_submission_no_worker_claimed_yet(store: Store) -> None:
    held, _ = _submission(store)
    with store.session() as session:
        assert end_submission(session, held)
    with store.session() as session:
        job = session.get_one(Job, held.job_id, populate_existing=True)
        assert job.status == JobStatus.QUEUED and job.started_at is not None
