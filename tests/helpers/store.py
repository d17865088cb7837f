"""A job with shards written straight into a test database, and claims made at a chosen time."""

from __future__ import annotations

from datetime import timedelta

from adqueue.core.clock import utcnow
from adqueue.store.models import Job, JobKind, JobStatus, JobSummary, Model, Shard
from adqueue.store.session import Store
from adqueue.store.transitions import ClaimedShard, claim_shard

LEASE = timedelta(seconds=30)


def job_with_shards(store: Store, n_shards: int = 2, kind: str = "score") -> tuple[int, list[int]]:
    with store.session() as session:
        model = Model(name=f"m{utcnow().timestamp()}", version=1, detector="mvg", params={}, artifact_path="x",
                      threshold=1.0)
        session.add(model)
        session.flush()
        job = Job(kind=kind, status=JobStatus.QUEUED, model_id=model.id, source="/data", params={},
                  queue="q", submitted_at=utcnow())
        session.add(job)
        session.flush()
        if kind != JobKind.TRAIN:  # as create_job does: a sharded job's summary starts with it
            session.add(JobSummary(job_id=job.id, updated_at=utcnow()))
        shards = [Shard(job_id=job.id, seq=i, n_items=2, items=[[f"/d/{i}a.png", None, None, None],
                                                                  [f"/d/{i}b.png", None, None, None]])
                  for i in range(n_shards)]
        session.add_all(shards)
        session.flush()
        return job.id, [s.id for s in shards]


def rows(claimed: ClaimedShard, score: float) -> list[dict]:
    return [{"path": path, "score": score, "is_anomaly": score > 1, "scored_at": utcnow()}
            for path, *_ in claimed.items]


def claim(store: Store, shard_id: int, worker: str = "w", at: timedelta = timedelta(0)) -> ClaimedShard | None:
    now = utcnow() + at
    with store.session() as session:
        return claim_shard(session, shard_id, worker, lease_until=now + LEASE, now=now)
