"""Submit jobs: validate, write the job and its shards to SQL, hand shard ids to the dispatcher.

Nothing here computes on images. Items are enumerated lazily and written a few dozen shards per
transaction, each batch enqueued right after its commit, so memory stays flat for any dump size
and workers can start on the first shards while the rest are still being listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

from sqlalchemy import case, exists, update

from adqueue.data.sources import Item, Source, open_source
from adqueue.detectors import registry
from adqueue.errors import AdqueueError, SourceError
from adqueue.service.context import Context
from adqueue.service.dispatch import Dispatcher
from adqueue.service.finishing import finish_if_complete
from adqueue.service.models import resolve_model
from adqueue.service.scoring import HEATMAP_MODES
from adqueue.service.training import split_train_settings
from adqueue.store.models import Job, JobKind, JobStatus, Shard, ShardStatus
from adqueue.store.writes import end_job

SHARDS_PER_COMMIT = 64
MAX_SHARD_SIZE = 10_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Submitted:
    job_id: int
    kind: str
    status: str
    n_total: int
    n_shards: int
    model_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kind": self.kind, "status": self.status, "n_total": self.n_total,
                "n_shards": self.n_shards, "model_id": self.model_id}


def submit_train(
    ctx: Context, dispatcher: Dispatcher, *, detector: str, data: str, name: str,
    settings: dict[str, str], split: str | None = None,
) -> Submitted:
    if not _NAME.match(name):
        raise AdqueueError(f"invalid model name {name!r}: letters, digits, '_', '-', '.'; at most 100 characters")
    _validate_detector_settings(detector, settings)
    source = open_source(data, split=split or None)
    if source.labeled and split is None:
        source = open_source(data, split="train")
    first = next((item for item in source.items() if item.label in (None, 0)), None)
    if first is None:
        raise SourceError(f"{source.describe()} has no defect-free images to train on")
    params = {"detector": detector, "settings": settings, "name": name, "split": source.split}
    with ctx.store.session() as session:
        job = Job(kind=JobKind.TRAIN, status=JobStatus.QUEUED, source=str(source.root), params=params)
        session.add(job)
        session.flush()
        job_id = job.id
    _dispatch(ctx, job_id, lambda: dispatcher.enqueue_train(job_id))
    dispatcher.after_submit(job_id)
    return _submitted(ctx, job_id, n_shards=0)


def _validate_detector_settings(detector: str, settings: dict[str, str]) -> None:
    from adqueue.detectors.base import build_config

    try:
        cls = registry.detector_class(detector)
        _, detector_settings = split_train_settings(settings)
        cls.validate_config(build_config(cls.Config, detector_settings))
    except (ValueError, TypeError) as exc:
        raise AdqueueError(str(exc)) from None


def submit_score(
    ctx: Context, dispatcher: Dispatcher, *, model: str, data: str, split: str | None = None,
    shard_size: int = 256, heatmaps: str = "flagged",
) -> Submitted:
    return _submit_sharded(ctx, dispatcher, JobKind.SCORE, model, open_source(data, split=split),
                           shard_size=shard_size, heatmaps=heatmaps)


def submit_evaluate(
    ctx: Context, dispatcher: Dispatcher, *, model: str, data: str, split: str | None = "test",
    shard_size: int = 256, heatmaps: str = "flagged",
) -> Submitted:
    source = open_source(data, split=split)
    if not source.labeled:
        raise SourceError(
            f"{data} is a plain folder without labels: evaluate needs an MVTec-style root "
            "(train/good, test/<defect>, ground_truth/<defect>) or a manifest CSV"
        )
    return _submit_sharded(ctx, dispatcher, JobKind.EVALUATE, model, source,
                           shard_size=shard_size, heatmaps=heatmaps)


def _submit_sharded(
    ctx: Context, dispatcher: Dispatcher, kind: str, model_ref: str, source: Source, *,
    shard_size: int, heatmaps: str,
) -> Submitted:
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise AdqueueError(f"--shard-size must be between 1 and {MAX_SHARD_SIZE}, not {shard_size}")
    if heatmaps not in HEATMAP_MODES:
        raise AdqueueError(f"--heatmaps must be one of {', '.join(HEATMAP_MODES)}, not {heatmaps!r}")
    items = source.items()
    first = next(items, None)
    if first is None:
        raise SourceError(f"no images in {source.describe()}")
    items = chain([first], items)
    if kind == JobKind.EVALUATE:
        items = (item for item in items if item.label is not None)
    with ctx.store.session() as session:
        model = resolve_model(session, model_ref)
        job = Job(
            kind=kind, status=JobStatus.SUBMITTING, model_id=model.id, source=str(source.root),
            params={"model": f"{model.name}:{model.version}", "split": source.split,
                    "heatmaps": heatmaps, "shard_size": shard_size},
        )
        session.add(job)
        session.flush()
        job_id, model_id = job.id, model.id
    n_total, n_shards = _dispatch(ctx, job_id, lambda: _write_shards(ctx, dispatcher, job_id, items, shard_size))
    with ctx.store.session() as session:
        started = exists().where(Shard.job_id == job_id, Shard.status != ShardStatus.QUEUED)
        session.execute(
            update(Job).where(Job.id == job_id)
            .values(n_total=n_total, status=case((started, JobStatus.RUNNING), else_=JobStatus.QUEUED))
        )
    finish_if_complete(ctx, job_id)
    dispatcher.after_submit(job_id)
    return _submitted(ctx, job_id, n_shards=n_shards, model_id=model_id)


def _write_shards(
    ctx: Context, dispatcher: Dispatcher, job_id: int, items: Iterator[Item], shard_size: int
) -> tuple[int, int]:
    n_total = n_shards = 0
    chunks = iter(lambda: list(islice(items, shard_size)), [])
    while batch := list(islice(chunks, SHARDS_PER_COMMIT)):
        with ctx.store.session() as session:
            shards = [
                Shard(job_id=job_id, seq=n_shards + offset, n_items=len(chunk), items=[i.to_row() for i in chunk])
                for offset, chunk in enumerate(batch)
            ]
            session.add_all(shards)
            session.flush()
            ids = [shard.id for shard in shards]
        dispatcher.enqueue_shards(ids)
        n_shards += len(batch)
        n_total += sum(len(chunk) for chunk in batch)
    return n_total, n_shards


def _dispatch(ctx: Context, job_id: int, action: Any) -> Any:
    """Run `action`; if enqueueing fails, the job is marked failed rather than left dangling."""
    try:
        return action()
    except Exception as exc:
        with ctx.store.session() as session:
            end_job(session, job_id, status=JobStatus.FAILED, error=f"submission failed: {exc}")
        raise


def _submitted(ctx: Context, job_id: int, *, n_shards: int, model_id: int | None = None) -> Submitted:
    with ctx.store.session() as session:
        job = session.get_one(Job, job_id, populate_existing=True)
        return Submitted(job.id, job.kind, job.status, job.n_total, n_shards, job.model_id or model_id)
