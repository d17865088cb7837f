"""Submit jobs: validate, write the job and its shards to SQL, hand shard ids to the dispatcher.

Nothing here computes on images. Items are enumerated lazily and written a few dozen shards per
transaction, each batch enqueued right after its commit, so memory stays flat for any dump size
and workers can start on the first shards while the rest are still being listed.

The submitter holds a lease on its job while it writes shards (renewed with each batch). If it
dies, the reconciler takes the submission over once the lease expires and continues it from the
last shard written (`continue_submission`); a Ctrl-C or signal marks the job for `resume`. The
SQL rows are the outbox: a shard written but never sent to the broker is sent by the reconciler.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

from sqlalchemy.orm import Session

from adqueue.core.clock import utcnow
from adqueue.core.errors import AdqueueError, SourceError
from adqueue.core.failpoints import failpoint
from adqueue.data.paths import to_os, to_text
from adqueue.data.sources import Item, Masks, Source, is_plain_folder, open_source
from adqueue.detectors import registry
from adqueue.jobs.context import Context
from adqueue.jobs.finishing import after_shard_closed
from adqueue.jobs.incremental import SkipScored
from adqueue.jobs.interrupts import interruptions_marked
from adqueue.jobs.leases import DB_RETRY_S, LeaseLost, lease_until
from adqueue.jobs.ports import Dispatcher
from adqueue.jobs.score_settings import HEATMAP_MODES
from adqueue.jobs.train_settings import TRAIN_KEYS, split_train_settings
from adqueue.store.models import Job, JobKind
from adqueue.store.queries import resolve_model, submission_progress
from adqueue.store.transitions import (
    ClaimedJob,
    add_shards,
    create_job,
    end_submission,
    fail_submission,
    stamp_enqueued_shards,
)

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
    # Masks beside images that the submission's walk of a plain folder met (left out of training).
    masks: Masks | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kind": self.kind, "status": self.status, "n_total": self.n_total,
                "n_shards": self.n_shards, "model_id": self.model_id,
                "n_masks_beside_images": self.masks.count if self.masks else 0}


def submit_train(
    ctx: Context, dispatcher: Dispatcher, *, detector: str, data: str, name: str,
    settings: dict[str, str], split: str | None = None,
) -> Submitted:
    if not _NAME.match(name):
        raise AdqueueError(f"invalid model name {name!r}: letters, digits, '_', '-', '.'; at most 100 characters")
    _validate_detector_settings(detector, settings)
    roots = ctx.settings.allowed_roots
    source = open_source(data, split=split or None, allowed_roots=roots)
    if source.labeled and split is None:
        source = open_source(data, split="train", allowed_roots=roots)
    # The whole listing, not just its first image: the masks it leaves out are counted for the user.
    masks = Masks(leave_out=True)
    normal = sum(1 for item in source.items(masks) if item.label in (None, 0))
    if not normal:
        raise SourceError(f"{source.describe()} has no defect-free images to train on")
    params = {"detector": detector, "settings": settings, "name": name, "split": source.split}
    with ctx.store.session() as session:
        job_id = create_job(session, kind=JobKind.TRAIN, source=to_text(str(source.root)), params=params, model_id=None,
                            queue=dispatcher.queue, worker=submitter(), lease_until=lease_until(ctx)).job_id
    with submission_guard(ctx, job_id):
        dispatcher.enqueue_train(job_id)
    dispatcher.after_submit(job_id)
    return replace(describe_job(ctx, job_id, n_shards=0), masks=masks)


def _validate_detector_settings(detector: str, settings: dict[str, str]) -> None:
    # The detector's Config and checks only (detectors/<name>/config.py): submitting imports no torch.
    try:
        spec = registry.config_spec(detector)
        _, detector_settings = split_train_settings(settings)
        own = sorted(spec.setting_names - TRAIN_KEYS.keys())  # its seed is the training's
        unknown = sorted(set(detector_settings) - set(own))
        if unknown:
            raise AdqueueError(f"unknown setting(s) {', '.join(unknown)}; {detector} settings: {', '.join(own)}; "
                               f"training settings (any detector): {', '.join(TRAIN_KEYS)}")
        spec.build(detector_settings)
    except (ValueError, TypeError) as exc:
        raise AdqueueError(str(exc)) from None


def submit_score(
    ctx: Context, dispatcher: Dispatcher, *, model: str, data: str, split: str | None = None,
    shard_size: int = 256, heatmaps: str = "flagged", skip_scored: bool = False,
) -> Submitted:
    source = open_source(data, split=split, allowed_roots=ctx.settings.allowed_roots)
    return _submit_sharded(ctx, dispatcher, JobKind.SCORE, model, source, shard_size=shard_size, heatmaps=heatmaps,
                           skip_scored=skip_scored)


def submit_evaluate(
    ctx: Context, dispatcher: Dispatcher, *, model: str, data: str, split: str | None = "test",
    shard_size: int = 256, heatmaps: str = "flagged",
) -> Submitted:
    if is_plain_folder(data):  # before the split is looked at: a plain folder has none, nor labels
        raise SourceError(
            f"{data} is a plain folder without labels: evaluate needs an MVTec-style root "
            "(train/good, test/<defect>, ground_truth/<defect>) or a manifest CSV"
        )
    source = open_source(data, split=split, allowed_roots=ctx.settings.allowed_roots)
    return _submit_sharded(ctx, dispatcher, JobKind.EVALUATE, model, source,
                           shard_size=shard_size, heatmaps=heatmaps)


def _submit_sharded(
    ctx: Context, dispatcher: Dispatcher, kind: str, model_ref: str, source: Source, *,
    shard_size: int, heatmaps: str, skip_scored: bool = False,
) -> Submitted:
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise AdqueueError(f"--shard-size must be between 1 and {MAX_SHARD_SIZE}, not {shard_size}")
    if heatmaps not in HEATMAP_MODES:
        raise AdqueueError(f"--heatmaps must be one of {', '.join(HEATMAP_MODES)}, not {heatmaps!r}")
    items = source.items()
    if next(items, None) is None:
        raise SourceError(f"no images in {source.describe()}")
    with ctx.store.session() as session:
        model = resolve_model(session, model_ref)
        params = {"model": f"{model.name}:{model.version}", "split": source.split, "heatmaps": heatmaps,
                  "shard_size": shard_size, "skip_scored": skip_scored}
        held = create_job(session, kind=kind, source=to_text(str(source.root)), params=params, model_id=model.id,
                          queue=dispatcher.queue, worker=submitter(), lease_until=lease_until(ctx))
        model_id = model.id
    masks = Masks(leave_out=False)
    n_shards = continue_submission(ctx, dispatcher, held, masks=masks)
    dispatcher.after_submit(held.job_id)
    return replace(describe_job(ctx, held.job_id, n_shards=n_shards, model_id=model_id), masks=masks)


def continue_submission(ctx: Context, dispatcher: Dispatcher, held: ClaimedJob, *,
                        masks: Masks | None = None) -> int:
    """Write the job's shards from wherever its submission stopped (the start, for a new job),
    then queue the job. Returns the number of shards written by this call; `masks` counts the
    masks beside images that the walk met (a score job scores them, like every file)."""
    with ctx.store.session() as session:
        job = session.get_one(Job, held.job_id)
        source_spec, kind, params, model_id = job.source, job.kind, dict(job.params), job.model_id
        n_shards, n_items, last_path = submission_progress(session, held.job_id)
    with submission_guard(ctx, held.job_id):
        source = open_source(to_os(source_spec), split=params.get("split"), allowed_roots=ctx.settings.allowed_roots)
        keep = _labeled if kind == JobKind.EVALUATE else None
        items = source.items_after(n_items, last_path, keep, masks)
        skip = SkipScored(ctx, model_id) if params.get("skip_scored") and model_id is not None else None
        if skip is not None:
            items = skip(items)
        skipped = skip.take_skipped if skip is not None else (lambda: 0)
        try:
            written = _write_shards(ctx, dispatcher, held, items, int(params["shard_size"]), first_seq=n_shards,
                                    skipped=skipped)
        except LeaseLost:
            return 0  # cancelled while submitting: nothing more to write
        if not ctx.store.transaction(lambda session: end_submission(session, held, skipped=skipped()),
                                     retry_s=DB_RETRY_S):
            return written
    after_shard_closed(ctx, held.job_id, dispatcher)  # every shard may already be done
    return written


def _labeled(item: Item) -> bool:
    return item.label is not None


def _write_shards(
    ctx: Context, dispatcher: Dispatcher, held: ClaimedJob, items: Iterator[Item], shard_size: int, *, first_seq: int,
    skipped: Callable[[], int],
) -> int:
    n_shards = 0
    chunks = iter(lambda: [item.to_row() for item in islice(items, shard_size)], [])
    while batch := list(islice(chunks, SHARDS_PER_COMMIT)):
        seq, left_out = first_seq + n_shards, skipped()

        def write(session: Session, batch: list[list[Any]] = batch, seq: int = seq, left_out: int = left_out,
                  ) -> list[int] | None:
            return add_shards(session, held, seq, batch, lease_until=lease_until(ctx), skipped=left_out)

        ids = ctx.store.transaction(write, retry_s=DB_RETRY_S)
        if ids is None:
            raise LeaseLost(f"the submission of job {held.job_id} lost its lease (cancelled?)")
        failpoint("submit.after_commit")
        dispatcher.enqueue_shards(ids)
        with ctx.store.session() as session:  # sent: the reconciler's outbox no longer owes them
            stamp_enqueued_shards(session, ids, utcnow())
        n_shards += len(batch)
    return n_shards


@contextmanager
def submission_guard(ctx: Context, job_id: int) -> Iterator[None]:
    """A submission that fails is marked failed, and one stopped by a signal or Ctrl-C is marked
    for `resume`, rather than left `submitting` (a SIGKILL is healed by the reconciler)."""
    try:
        with interruptions_marked(ctx, job_id):
            yield
    except Exception as exc:
        error = f"submission failed: {exc}; `adqueue resume {job_id}` retries it"
        with ctx.store.session() as session:
            fail_submission(session, job_id, error)
        if isinstance(exc, AdqueueError):  # the broker lost, a source gone: one line that says what to run
            raise AdqueueError(f"job {job_id}: {error}") from None
        raise


def submitter() -> str:
    return f"submit-{os.getpid()}@{socket.gethostname()}"


def describe_job(ctx: Context, job_id: int, *, n_shards: int | None = None, model_id: int | None = None) -> Submitted:
    with ctx.store.session() as session:
        job = session.get_one(Job, job_id, populate_existing=True)
        if n_shards is None:
            n_shards = submission_progress(session, job_id)[0]
        return Submitted(job.id, job.kind, job.status, job.n_total, n_shards, job.model_id or model_id)
