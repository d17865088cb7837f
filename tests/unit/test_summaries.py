"""Job summaries on SQLite and PostgreSQL: equal to a rebuild from the rows after every kind of close (retry,
takeover, give-up, cancel, resume), bins that hold their scores, and summaries built for jobs that
have none."""

from __future__ import annotations

import json
import math
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, insert

from adqueue.store import summaries
from adqueue.store.migrate import ensure_schema
from adqueue.store.models import (
    Job,
    JobFolder,
    JobKind,
    JobStatus,
    JobSummary,
    Model,
    Result,
    ShardSummary,
    utcnow,
)
from adqueue.store.session import Store
from adqueue.store.transitions import (
    cancel_job,
    complete_shard,
    give_up_shard,
    release_shard,
    reopen_job,
)
from tests.helpers.store import LEASE, claim, job_with_shards


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    from benchmarks.harness.servers import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'a.db'}"
    else:
        from benchmarks.harness.servers import create_database

        url = create_database(request.getfixturevalue("postgres"), f"s_{uuid.uuid4().hex[:10]}")
    store = Store(url)
    ensure_schema(store)
    yield store
    store.engine.dispose()


def assert_matches_rows(store: Store, job_id: int) -> summaries.Rebuilt:
    with store.session() as session:
        kept, rebuilt = summaries.stored(session, job_id), summaries.rebuild(session, job_id)
    assert kept is not None
    assert kept.job == rebuilt.job
    assert kept.shards == rebuilt.shards
    return kept


def scored_rows(items: list, seed: int, error_every: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for index, (path, *_) in enumerate(items):
        if error_every and index % error_every == 0:
            out.append({"path": path, "error": "corrupt", "scored_at": utcnow()})
            continue
        score = rng.lognormvariate(0, 1) * rng.choice((1, -1, 1000))
        out.append({"path": path, "score": score, "is_anomaly": score > 1.0, "scored_at": utcnow()})
    return out


def test_bins_hold_their_scores_in_order_at_any_scale_and_sign() -> None:
    rng = random.Random(1)
    values = [0.0, -0.0, 1.0, -1.0, 1e-300, -1e300, 5e-324] + [
        rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30) for _ in range(20_000)]
    for value in values:
        low, high = summaries.bin_bounds(summaries.score_bin(value))
        assert low <= value <= high, (value, low, high)
        if abs(value) > 1e-300:  # not a subnormal
            assert (high - low) <= abs(value) * 2 ** -summaries.HIST_BITS * 1.0001
    ordered = sorted(values)
    bins = [summaries.score_bin(v) for v in ordered]
    assert bins == sorted(bins)


def test_summaries_equal_the_rows_after_retries_takeovers_give_up_cancel_and_resume(store: Store) -> None:
    job_id, shard_ids = job_with_shards(store, n_shards=4)
    with store.session() as session:  # 40 files per shard, in two folders
        for seq, shard_id in enumerate(shard_ids):
            items = [[f"/d/cam{i % 2}/{seq}_{i}.png", None, None, None] for i in range(40)]
            session.execute(Job.__table__.update().where(Job.id == job_id).values(n_total=160))
            from adqueue.store.models import Shard
            session.get_one(Shard, shard_id).items = items

    first = claim(store, shard_ids[0], "w1")
    assert first is not None
    with store.session() as session:
        assert complete_shard(session, first, scored_rows(first.items, 1, error_every=7), n_ok=34, n_failed=6)
    assert_matches_rows(store, job_id)

    # Retried: the first attempt is released, the second closes it.
    second = claim(store, shard_ids[1], "w1")
    assert second is not None
    with store.session() as session:
        release_shard(session, second, "boom", retry_at=None)
    retried = claim(store, shard_ids[1], "w2")
    assert retried is not None
    with store.session() as session:
        assert complete_shard(session, retried, scored_rows(retried.items, 2), n_ok=40, n_failed=0)
    assert_matches_rows(store, job_id)

    # Taken over after its lease expired: the stale run writes nothing, the new one writes.
    stale = claim(store, shard_ids[2], "w1")
    taker = claim(store, shard_ids[2], "w2", at=LEASE * 2)
    assert stale is not None and taker is not None
    with store.session() as session:
        assert not complete_shard(session, stale, scored_rows(stale.items, 3), n_ok=40, n_failed=0)
        assert complete_shard(session, taker, scored_rows(taker.items, 4), n_ok=40, n_failed=0)
    assert_matches_rows(store, job_id)

    # Given up: an error row per image, kept apart since the shard may be resumed.
    doomed = claim(store, shard_ids[3], "w1")
    assert doomed is not None
    with store.session() as session:
        assert give_up_shard(session, doomed.shard_id, doomed.run_id, "poison", model_id=None, items=doomed.items)
    kept = assert_matches_rows(store, job_id)
    assert set(kept.shards) == {shard_ids[3]} and kept.shards[shard_ids[3]].n_errors == 40

    # Cancelled, resumed: the failed shard runs again and its error rows' part is replaced.
    with store.session() as session:
        cancel_job(session, job_id, "stop")
    with store.session() as session:
        assert reopen_job(session, job_id, queue="q")
    again = claim(store, shard_ids[3], "w3")
    assert again is not None
    with store.session() as session:
        assert complete_shard(session, again, scored_rows(again.items, 5), n_ok=40, n_failed=0)
    kept = assert_matches_rows(store, job_id)
    assert kept.shards == {}
    assert kept.job.n_rows == 160 and kept.job.n_errors == 6 and sum(kept.job.histogram.values()) == 154
    assert {name: counts[0] for name, counts in kept.job.folders.items()} == {"/d/cam0/": 80, "/d/cam1/": 80}


def test_a_job_without_a_summary_gets_one_built_from_its_rows(store: Store) -> None:
    job_id, shard_ids = job_with_shards(store, n_shards=2)
    with store.session() as session:
        session.execute(insert(Result), [
            {"job_id": job_id, "shard_id": shard_ids[i % 2] if i % 3 else None, "path": f"/x/{i}.png",
             "score": i / 10, "is_anomaly": i > 50, "scored_at": utcnow()} for i in range(100)])
        for table in (JobSummary, ShardSummary, JobFolder):
            session.execute(delete(table).where(table.job_id == job_id))
    # A close of a job with other rows and no summary leaves the summary to the build.
    claimed = claim(store, shard_ids[0])
    assert claimed is not None
    with store.session() as session:
        assert complete_shard(session, claimed, scored_rows(claimed.items, 9), n_ok=2, n_failed=0)
        assert summaries.missing(session) == [job_id]
        assert summaries.build(session, job_id)
        assert summaries.missing(session) == []
    kept = assert_matches_rows(store, job_id)
    assert kept.job.n_rows == 102


def test_quantiles_from_the_bins_are_within_half_a_bin() -> None:
    rng = random.Random(3)
    scores = sorted(rng.gauss(1000, 0.5) for _ in range(5000))
    summary = summaries.summarize({"path": f"{i}", "score": s, "is_anomaly": False} for i, s in enumerate(scores))
    for percent in (50, 90, 99):
        exact = scores[math.ceil(percent * len(scores) / 100) - 1]
        assert summaries.quantile(summary.histogram, percent / 100) == pytest.approx(
            exact, abs=exact * 2 ** -summaries.HIST_BITS)


def test_concurrent_closers_of_one_job_add_up(store: Store) -> None:
    job_id, shard_ids = job_with_shards(store, n_shards=24)
    with store.session() as session:
        from adqueue.store.models import Shard
        for seq, shard_id in enumerate(shard_ids):
            session.get_one(Shard, shard_id).items = [[f"/n/c{i % 3}/{seq}_{i}.png", None, None, None]
                                                      for i in range(64)]
    failures: list[BaseException] = []

    def closer(mine: list[int]) -> None:
        try:
            for shard_id in mine:
                held = claim(store, shard_id)
                assert held is not None
                rows = scored_rows(held.items, shard_id, error_every=11)
                assert store.transaction(lambda session, held=held, rows=rows: complete_shard(
                    session, held, rows, n_ok=len(rows), n_failed=0), retry_s=30)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failures.append(exc)

    threads = [threading.Thread(target=closer, args=(shard_ids[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    kept = assert_matches_rows(store, job_id)
    assert kept.job.n_rows == 24 * 64


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_revision_0009_moves_each_summary_histogram_into_bins(dialect: str, request: pytest.FixtureRequest,
                                                             tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import select, text

    from adqueue.store.migrate import alembic_config, upgrade
    from adqueue.store.models import JobScoreBin

    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        from benchmarks.harness.servers import create_database

        url = create_database(request.getfixturevalue("postgres"), f"m_{uuid.uuid4().hex[:10]}")
    store = Store(url)
    config = alembic_config()
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0008")
    histograms = [{"-7": 3, "0": 1, "1074": 12}, {"5000": 1}, {}]
    with store.session() as session:
        model = Model(name="m", version=1, detector="mvg", params={}, artifact_path="x", threshold=1.0)
        session.add(model)
        session.flush()
        jobs = [Job(kind=JobKind.SCORE, status=JobStatus.DONE, model_id=model.id, source="/d", params={}, queue="q",
                    submitted_at=utcnow()) for _ in histograms]
        session.add_all(jobs)
        session.flush()
        ids = {job.id: histogram for job, histogram in zip(jobs, histograms, strict=True)}
        for job_id, histogram in ids.items():  # as revision 0008 wrote them: one JSON value per summary
            session.execute(text("INSERT INTO job_summaries (job_id, n_rows, n_scored, n_flagged, n_errors, n_normal, "
                                 "histogram, updated_at) VALUES (:id, 0, 0, 0, 0, 0, :h, :now)"),
                            {"id": job_id, "h": json.dumps(histogram), "now": utcnow()})
    assert upgrade(store)
    with store.session() as session:
        moved = {job_id: {str(key): n for key, n in session.execute(
            select(JobScoreBin.bin, JobScoreBin.n).where(JobScoreBin.job_id == job_id))} for job_id in ids}
        assert moved == ids
        assert summaries.histogram(session, min(ids)) == {-7: 3, 0: 1, 1074: 12}
    store.engine.dispose()
