"""The embedded default: each job runs in this process as soon as it is submitted or resumed.

The very same runners a worker runs (shard, train, finish), in order, with progress shown in the
terminal. SIGTERM, SIGHUP and SIGINT stop such a run cleanly (adqueue/jobs/interrupts.py): the
job is marked failed with the `adqueue resume` command that completes it, its open shards are
queued again, and the interrupted attempt is not counted.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

from sqlalchemy import select

from adqueue.core.progress import Progress
from adqueue.jobs.context import Context
from adqueue.jobs.interrupts import interruptions_marked, raise_if_signalled, signalled
from adqueue.jobs.ports import ScoreProgress
from adqueue.pipeline.device import apply_torch_threads, resolve_device
from adqueue.runners.finish import run_finish
from adqueue.runners.lease import Outcome
from adqueue.runners.models import ModelCache
from adqueue.store.models import Job, JobKind, Shard, ShardStatus


class InlineDispatcher:
    """A Dispatcher that runs the work itself, right after it is submitted.

    Torch is imported, its threads capped and the device resolved on first use of `device` (the
    first training or shard), so one built only to finish an evaluation (`adqueue reconcile`)
    never imports it; the CLI resolves the device at once, so that a bad `--device` fails before a
    job is submitted."""

    queue: str | None = None

    def __init__(
        self,
        ctx: Context,
        *,
        train_progress: Callable[[], Progress],
        score_progress: Callable[[], ScoreProgress],
    ) -> None:
        self.ctx = ctx
        self.worker = f"inline-{os.getpid()}@{socket.gethostname()}"
        self._train_progress = train_progress
        self._score_progress = score_progress
        self._finish_due: set[int] = set()
        self._in_shard_loop = False

    @cached_property
    def device(self) -> Any:
        apply_torch_threads(self.ctx.settings.torch_threads)  # before torch computes anything here
        return resolve_device(self.ctx.settings.device)

    @cached_property
    def models(self) -> ModelCache:
        return ModelCache(self.ctx, self.device)

    def enqueue_train(self, job_id: int) -> None:
        pass  # the job is found in SQL by after_submit

    def enqueue_shards(self, shard_ids: Sequence[int], *, countdown: float = 0.0) -> None:
        pass

    def enqueue_finish(self, job_id: int) -> None:
        if self._in_shard_loop:
            self._finish_due.add(job_id)  # run once the loop over shards is out of the way
        else:
            run_finish(self.ctx, job_id, worker=self.worker)

    def after_submit(self, job_id: int) -> None:
        with interruptions_marked(self.ctx, job_id):
            self._run(job_id)

    def _run(self, job_id: int) -> None:
        # torch: only once a job runs here (`adqueue reconcile` builds this dispatcher too).
        from adqueue.runners.shard import run_shard
        from adqueue.runners.train import run_train_job

        with self.ctx.store.session() as session:
            job = session.get_one(Job, job_id)
            kind, total, done = job.kind, job.n_total, job.n_done + job.n_failed
        if kind == JobKind.TRAIN:
            run_train_job(self.ctx, job_id, worker=self.worker, display=self._train_progress(), device=self.device)
            return
        with self.ctx.store.session() as session:
            shard_ids = list(session.scalars(
                select(Shard.id).where(Shard.job_id == job_id, Shard.status == ShardStatus.QUEUED).order_by(Shard.seq)
            ))
        if not shard_ids:
            return
        progress = self._score_progress()
        progress.start(total, f"{kind} job {job_id}")
        progress.advance(done)
        self._in_shard_loop = True
        try:
            for shard_id in shard_ids:
                outcome = Outcome.RETRY
                while outcome is Outcome.RETRY:
                    raise_if_signalled()
                    outcome = run_shard(self.ctx, shard_id, models=self.models, worker=self.worker, dispatcher=self,
                                        on_batch=progress.advance, stopping=signalled)
                if outcome in (Outcome.LOST, Outcome.JOB_FAILED):
                    break  # cancelled from elsewhere, or a permanent error failed the job
        finally:
            self._in_shard_loop = False
            progress.stop()
        raise_if_signalled()  # the last shard's run may have taken the signal for a shutdown
        if job_id in self._finish_due:
            self._finish_due.discard(job_id)
            run_finish(self.ctx, job_id, worker=self.worker)
