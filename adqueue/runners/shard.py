"""Score one shard: claim it under a lease, score its images in batches, write everything at once.

The same run serves score and evaluate jobs (evaluate also keeps the anomaly maps for the pixel
metrics). A file that cannot be decoded becomes a result row with an error. The lease is renewed
as batches complete; a run that finds it gone (cancelled, or expired and taken over) stops and
writes nothing, and the rows of a shard are written in the same transaction as its guarded
completion. An exception releases the shard for another attempt, up to `max_attempts`, after which
its images get error rows and the shard is failed, so a poisoned shard cannot loop forever; a
missing or broken model file fails the whole job at once instead, since no retry can fix it.
Files are not a reason to fail: heat maps and evaluation maps a full disk kept from being written
are counted on the job (note_unwritten_files, in the completion's transaction) and the scores kept.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import numpy as np
from sqlalchemy.orm import Session

from adqueue.core.clock import utcnow
from adqueue.core.datadir import atomic_write_bytes
from adqueue.core.errors import ModelUnavailable
from adqueue.core.failpoints import failpoint
from adqueue.data.sources import Item
from adqueue.jobs.context import Context
from adqueue.jobs.finishing import after_shard_closed
from adqueue.jobs.leases import DB_RETRY_S, Lease, LeaseLost, lease_until
from adqueue.jobs.ports import Dispatcher
from adqueue.pipeline.model_files import LoadedModel
from adqueue.pipeline.score import ScoreIO, eval_maps_bytes, heatmap_key, remove_heatmaps, score_items
from adqueue.runners.lease import LeasedRun, Outcome
from adqueue.store.models import JobKind, RunOutcome
from adqueue.store.queries import other_shard_runs, shard_closed_by, shard_job_id
from adqueue.store.transitions import (
    ClaimedShard,
    Unwritten,
    claim_shard,
    complete_shard,
    end_run,
    fail_job,
    give_up_shard,
    note_unwritten_files,
    release_shard,
    renew_shard_lease,
)

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_S = 300.0

ModelProvider = Callable[[int], LoadedModel]


class ShardRun(LeasedRun[ClaimedShard]):
    def __init__(self, ctx: Context, shard_id: int, *, models: ModelProvider, worker: str, dispatcher: Dispatcher,
                 on_batch: Callable[[int], None] | None = None, stopping: Callable[[], bool] | None = None) -> None:
        super().__init__(ctx, stopping=stopping)
        self.shard_id = shard_id
        self.models = models
        self.worker = worker
        self.dispatcher = dispatcher
        self.on_batch = on_batch

    def claim(self, session: Session) -> ClaimedShard | None:
        return claim_shard(session, self.shard_id, self.worker, lease_until=lease_until(self.ctx))

    def skipped(self) -> None:
        # A duplicate delivery, or the redelivery of a shard whose worker died right after closing
        # it: make sure its job does not stay behind.
        job_id = self.ctx.store.transaction(lambda session: shard_job_id(session, self.shard_id))
        if job_id is not None:
            after_shard_closed(self.ctx, job_id, self.dispatcher)

    def work(self, held: ClaimedShard) -> Outcome:
        ctx = self.ctx
        if held.model_id is None:
            raise ModelUnavailable(f"job {held.job_id} has no model")
        loaded = self.models(held.model_id)
        # Timed from here: loading a model once per process is not a step to stretch the lease by.
        lease = Lease(ctx, lambda session, until: renew_shard_lease(session, held.shard_id, held.run_id, until),
                      f"shard {held.shard_id} (job {held.job_id})")
        lease.touch(force=True)

        def batch_done(n: int) -> None:
            lease.touch()
            if self.on_batch is not None:
                self.on_batch(n)

        output = score_items(
            loaded, [Item.from_row(row) for row in held.items], data_dir=ctx.data_dir, job_id=held.job_id,
            run_id=held.run_id, heatmaps=str(held.job_params.get("heatmaps", "flagged")),
            keep_maps=held.job_kind == JobKind.EVALUATE,
            batch_size=ctx.settings.batch_size, max_bytes=ctx.settings.max_file_bytes, on_batch=batch_done,
            transfer=ScoreIO(decode_threads=ctx.settings.decode_threads, pin_memory=ctx.settings.pin_memory,
                             gpu_decode=ctx.settings.gpu_decode),
        )
        unwritten = Unwritten(output.heatmaps_unwritten, 0, output.unwritten_reason)
        if output.maps is not None:
            unwritten = self._write_eval_maps(held, output.maps, unwritten)

        def close(session: Session) -> bool:
            won = complete_shard(session, held, output.rows, n_ok=output.n_ok, n_failed=len(output.rows) - output.n_ok)
            if won and unwritten:
                note_unwritten_files(session, held.job_id, unwritten)
            return won

        won = ctx.store.transaction(close, retry_s=DB_RETRY_S)
        if not won and ctx.store.transaction(lambda session: shard_closed_by(session, held.shard_id, held.run_id)):
            won = True  # a retry after a commit whose reply was lost (a database restart): it is ours
        if not won:
            remove_heatmaps(ctx.data_dir, output.rows)  # no row of this run was written to point to them
            raise LeaseLost(f"shard {held.shard_id} (job {held.job_id}) lost its lease before its results were "
                            "written (cancelled, or taken over after it expired)")
        return Outcome.DONE

    def _write_eval_maps(self, held: ClaimedShard, maps: dict[str, np.ndarray], unwritten: Unwritten) -> Unwritten:
        """Named by run: a copy that lost its lease cannot overwrite the maps of the run that closed
        it. A full disk costs the pixel metrics these images, not the shard's scores."""
        target = self.ctx.data_dir.eval_maps_file(held.job_id, held.seq, held.run_id)
        try:
            atomic_write_bytes(target, eval_maps_bytes(maps))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            log.error("shard %s (job %s): the anomaly maps of %d image(s) were not written: %s", held.shard_id,
                      held.job_id, len(maps), reason)
            return replace(unwritten, eval_maps=len(maps), reason=reason)
        return unwritten

    def completed(self, held: ClaimedShard) -> None:
        failpoint("shard.committed")
        if held.attempts > 1:
            self._sweep_earlier_runs(held)
        after_shard_closed(self.ctx, held.job_id, self.dispatcher)

    def _sweep_earlier_runs(self, held: ClaimedShard) -> None:
        """Heat maps an earlier run of this shard left behind (its worker died mid-shard): no row
        points to them, since the rows are this run's."""
        earlier = self.ctx.store.transaction(lambda session: other_shard_runs(session, held.shard_id, held.run_id))
        keys = [heatmap_key(row[0]) for row in held.items]
        for run_id in earlier:
            for key in keys:
                self.ctx.data_dir.heatmap_file(held.job_id, key, run_id).unlink(missing_ok=True)

    def give_up(self, held: ClaimedShard, error: str) -> Outcome:
        """Fail the shard, with an error row for each of its images so none goes missing."""
        with self.ctx.store.session() as session:
            give_up_shard(session, held.shard_id, held.run_id, error, model_id=held.model_id, items=held.items)
        after_shard_closed(self.ctx, held.job_id, self.dispatcher)
        return Outcome.FAILED

    def lost(self, held: ClaimedShard, exc: LeaseLost) -> None:
        log.warning("%s; its results were not written", exc)
        with self.ctx.store.session() as session:
            end_run(session, held.run_id, RunOutcome.LOST, str(exc))

    def failed(self, held: ClaimedShard, exc: Exception) -> Outcome:
        if isinstance(exc, ModelUnavailable):
            log.error("job %s failed: %s", held.job_id, exc)
            with self.ctx.store.session() as session:
                fail_job(session, held.job_id, str(exc))
            return Outcome.JOB_FAILED
        error = f"{type(exc).__name__}: {exc}"
        log.error("shard %s (job %s) attempt %s failed: %s\n%s", held.shard_id, held.job_id,
                  held.attempts, error, traceback.format_exc())
        if held.attempts >= self.ctx.settings.max_attempts:
            return self.give_up(held, error)
        delay = min(self.ctx.settings.retry_delay_s * 4 ** (held.attempts - 1), MAX_RETRY_DELAY_S)
        retry_at = utcnow() + timedelta(seconds=delay)
        with self.ctx.store.session() as session:
            released = release_shard(session, held, error, retry_at=retry_at)
        if released:
            self.dispatcher.enqueue_shards([held.shard_id], countdown=delay)
        return Outcome.RETRY

    def interrupted(self, held: ClaimedShard) -> None:
        """Ctrl-C or a signal in an embedded run, a worker's cold shutdown: this attempt does not
        count, and the reconciler sends the shard's message again."""
        with self.ctx.store.session() as session:
            release_shard(session, held, "interrupted", retry_at=None, counted=False)


def run_shard(ctx: Context, shard_id: int, *, models: ModelProvider, worker: str, dispatcher: Dispatcher,
              on_batch: Callable[[int], None] | None = None, stopping: Callable[[], bool] | None = None) -> Outcome:
    """Score one shard. `stopping`: whether this process is shutting down (an exception then
    releases the shard without counting the attempt)."""
    return ShardRun(ctx, shard_id, models=models, worker=worker, dispatcher=dispatcher, on_batch=on_batch,
                    stopping=stopping).run()
