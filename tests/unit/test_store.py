"""The SQL store on SQLite: schema parity with the migration, idempotent writes, guarded steps."""

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select

from adqueue.store.migrate import ensure_schema, head_revision
from adqueue.store.models import Base, Job, JobStatus, Model, Result, Shard, ShardStatus, utcnow
from adqueue.store.session import Store
from adqueue.store.writes import claim_job_finish, claim_shard, complete_shard, release_shard, upsert_results


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


def _job_with_shards(store: Store, n_shards: int = 2) -> tuple[int, list[int]]:
    with store.session() as session:
        model = Model(name="m", version=1, detector="mvg", params={}, artifact_path="x", threshold=1.0)
        session.add(model)
        session.flush()
        job = Job(kind="score", status=JobStatus.QUEUED, model_id=model.id, source="/data", params={})
        session.add(job)
        session.flush()
        shards = [Shard(job_id=job.id, seq=i, n_items=2, items=[[f"/d/{i}a.png", None, None, None],
                                                                  [f"/d/{i}b.png", None, None, None]])
                  for i in range(n_shards)]
        session.add_all(shards)
        session.flush()
        return job.id, [s.id for s in shards]


def _rows(job_id: int, shard_id: int, score: float) -> list[dict]:
    return [{"job_id": job_id, "shard_id": shard_id, "path": f"/d/{shard_id}{k}.png", "score": score,
             "is_anomaly": score > 1, "scored_at": utcnow()} for k in "ab"]


def test_a_shard_run_twice_writes_nothing_twice(store: Store) -> None:
    job_id, (first, _) = _job_with_shards(store)
    for score in (0.5, 2.0):  # a redelivered shard, e.g. after a lost ack
        with store.session() as session:
            claimed = claim_shard(session, first, "w1")
            assert claimed is not None
            upsert_results(session, _rows(job_id, first, score))
            complete_shard(session, claimed, n_ok=2, n_failed=0)
        with store.session() as session:
            session.execute(Shard.__table__.update().where(Shard.id == first).values(status="queued"))
    with store.session() as session:
        rows = session.scalars(select(Result).where(Result.job_id == job_id)).all()
        assert len(rows) == 2 and {r.score for r in rows} == {2.0}
        job = session.get_one(Job, job_id)
        assert job.n_done == 4  # counted per completed run: the test re-queued it by hand


def test_completion_is_counted_once_when_two_runs_race(store: Store) -> None:
    job_id, (first, _) = _job_with_shards(store)
    with store.session() as session:
        a = claim_shard(session, first, "w1")
    with store.session() as session:
        b = claim_shard(session, first, "w2")  # the redelivered copy claims the running shard
    assert a is not None and b is not None and b.attempts == 2
    with store.session() as session:
        assert complete_shard(session, a, n_ok=2, n_failed=0) is True
    with store.session() as session:
        assert complete_shard(session, b, n_ok=2, n_failed=0) is False
        assert claim_shard(session, first, "w3") is None  # done shards are never handed out again
    with store.session() as session:
        assert session.get_one(Job, job_id).n_done == 2


def test_the_job_finishes_once_and_only_when_all_shards_are_closed(store: Store) -> None:
    job_id, shard_ids = _job_with_shards(store)
    with store.session() as session:
        claimed = [claim_shard(session, s, "w") for s in shard_ids]
    with store.session() as session:
        complete_shard(session, claimed[0], n_ok=2, n_failed=0)
        assert claim_job_finish(session, job_id) is None
    with store.session() as session:
        release_shard(session, shard_ids[1], "boom")
        assert claim_job_finish(session, job_id) is None
        again = claim_shard(session, shard_ids[1], "w")
        complete_shard(session, again, n_ok=0, n_failed=2, status=ShardStatus.FAILED, error="boom")
    with store.session() as session:
        assert claim_job_finish(session, job_id) == JobStatus.FAILED
    with store.session() as session:
        assert claim_job_finish(session, job_id) is None
        job = session.get_one(Job, job_id)
        assert job.n_done == 2 and job.n_failed == 2 and "1 shard(s) failed" in job.error


def test_results_are_unique_per_job_and_path(store: Store) -> None:
    job_id, (first, second) = _job_with_shards(store)
    with store.session() as session:
        upsert_results(session, _rows(job_id, first, 1.0) + _rows(job_id, second, 1.0))
        upsert_results(session, _rows(job_id, first, 3.0))
        assert session.scalar(select(func.count()).select_from(Result)) == 4
