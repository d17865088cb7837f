"""The write path at many workers: K processes closing shards into PostgreSQL, total rows/s.

    python benchmarks/writers.py [--processes 1,2,4,8] [--shards 40] [--rows 256] [--profile FILE]

A throwaway PostgreSQL (benchmarks/harness/servers.py) holds one score job with K x --shards
shards of --rows items. Each of K processes claims its shards one after another and closes each
through the real guarded completion (store/transitions.py: claim_shard, then complete_shard in one
transaction: the guarded UPDATE, the bulk upsert of the rows, the job's counts and its summary)
with made-up scores: no model, no images, only what the database and the code around it cost.
Rows carry every column a scored image has (sha256, size, scores, heat-map path for flagged).

Run it from another checkout (an older commit, same virtualenv) to compare: it imports the adqueue
beside it. It prints rows/s for each K (all processes' rows over the wall time from a common start to the
last close), and checks that the job's summary equals a rebuild from its rows at the end.
`--profile FILE`: cProfile of one process at the largest K, written to FILE (top entries printed).
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import pstats
import random
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from harness.servers import PostgresServer, create_database

from adqueue.core.clock import utcnow
from adqueue.store.migrate import ensure_schema
from adqueue.store.models import Job, JobKind, JobStatus, Model, Shard
from adqueue.store.session import Store
from adqueue.store.transitions import claim_shard, complete_shard

THRESHOLD = 3.0


def make_job(url: str, n_shards: int, n_rows: int) -> tuple[int, list[int], int]:
    store = Store(url)
    ensure_schema(store)
    with store.session() as session:
        model = Model(name=f"w{time.time_ns()}", version=1, detector="mvg", params={}, artifact_path="m",
                      threshold=THRESHOLD)
        session.add(model)
        session.flush()
        job = Job(kind=JobKind.SCORE, status=JobStatus.QUEUED, model_id=model.id, source="/plant/night", params={},
                  queue="gpu", submitted_at=utcnow(), n_total=n_shards * n_rows)
        session.add(job)
        session.flush()
        shards = [Shard(job_id=job.id, seq=seq, n_items=n_rows, items=[
            [f"/plant/night/cam{i % 8}/{seq:06d}_{i:04d}.png", None, None, None] for i in range(n_rows)])
            for seq in range(n_shards)]
        session.add_all(shards)
        session.flush()
        ids = (job.id, [s.id for s in shards], model.id)
    store.engine.dispose()
    return ids


def fake_rows(items: list[Any], model_id: int, rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for path, label, defect, _ in items:
        score = rng.lognormvariate(0.0, 0.5)
        flagged = score > THRESHOLD
        rows.append({
            "model_id": model_id, "path": path, "label": label, "defect": defect, "error": None,
            "scored_at": utcnow(), "heatmap_path": f"heatmaps/1/{rng.getrandbits(64):016x}.png" if flagged else None,
            "sha256": f"{rng.getrandbits(256):064x}", "score": score, "is_anomaly": flagged, "width": 1024,
            "height": 1024, "scores": None, "file_size": 250_000 + rng.randrange(10_000),
            "file_mtime_ns": 1_764_000_000_000_000_000 + rng.randrange(10**12),
        })
    return rows


def writer(url: str, shard_ids: list[int], model_id: int, start_at: float, profile: str | None,
           out: Any) -> None:
    store = Store(url)
    store.check_reachable()
    rng = random.Random(shard_ids[0])
    profiler = cProfile.Profile() if profile else None
    while time.time() < start_at:
        time.sleep(0.001)
    if profiler:
        profiler.enable()
    rows_written = 0
    for shard_id in shard_ids:
        now = utcnow()
        with store.session() as session:
            held = claim_shard(session, shard_id, "bench", lease_until=now + timedelta(seconds=60), now=now)
        assert held is not None
        rows = fake_rows(held.items, model_id, rng)
        won = store.transaction(lambda session, held=held, rows=rows: complete_shard(
            session, held, rows, n_ok=len(rows), n_failed=0))
        assert won
        rows_written += len(rows)
    ended = time.time()
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    out.put((rows_written, ended))


def run(url: str, k: int, shards_per_process: int, n_rows: int, profile: str | None) -> float:
    job_id, shard_ids, model_id = make_job(url, k * shards_per_process, n_rows)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start_at = time.time() + 3.0  # every process connected and waiting
    processes = [ctx.Process(target=writer, args=(url, shard_ids[i::k], model_id, start_at,
                                                  profile if i == 0 else None, results)) for i in range(k)]
    for process in processes:
        process.start()
    done = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(60)
    total, last = sum(n for n, _ in done), max(t for _, t in done)
    try:
        from adqueue.store import summaries
    except ImportError:  # run from a checkout of a commit before summaries: nothing to check
        return total / (last - start_at)
    store = Store(url)
    with store.session() as session:
        kept, rebuilt = summaries.stored(session, job_id), summaries.rebuild(session, job_id)
    assert kept is not None and kept.job == rebuilt.job, "the summary differs from a rebuild from the rows"
    store.engine.dispose()
    return total / (last - start_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2,4,8")
    parser.add_argument("--shards", type=int, default=40, help="shards each process closes")
    parser.add_argument("--rows", type=int, default=256, help="rows per shard")
    parser.add_argument("--profile", type=Path, help="cProfile one process at the largest K into this file")
    args = parser.parse_args()
    ks = [int(k) for k in args.processes.split(",") if k]
    server = PostgresServer()
    try:
        print("| processes (K) | rows/s total | rows/s per process |")
        print("|---|---|---|")
        for k in ks:
            url = create_database(server.url, f"writers_{k}")
            profile = str(args.profile) if args.profile and k == max(ks) else None
            rate = run(url, k, args.shards, args.rows, profile)
            print(f"| {k} | {rate:,.0f} | {rate / k:,.0f} |", flush=True)
    finally:
        server.close()
    if args.profile:
        pstats.Stats(str(args.profile), stream=sys.stdout).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
