"""Where submitted work goes: to Celery through Redis, or straight into this process.

The embedded default (no broker) runs the very same `run_train_job` / `run_shard` functions a
worker runs, in order, right after submission, with progress shown in the terminal.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import select

from adqueue.detectors.base import Progress
from adqueue.service.context import Context
from adqueue.service.models import ModelCache, apply_torch_threads, resolve_device
from adqueue.service.scoring import ShardOutcome, run_shard
from adqueue.service.training import run_train_job
from adqueue.store.models import Job, JobKind, JobStatus, Shard, ShardStatus
from adqueue.store.writes import end_job


class Dispatcher(Protocol):
    def enqueue_train(self, job_id: int) -> None: ...

    def enqueue_shards(self, shard_ids: list[int]) -> None: ...

    def after_submit(self, job_id: int) -> None: ...


class ScoreProgress(Protocol):
    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def stop(self) -> None: ...


class InlineDispatcher:
    """Runs each job in this process as soon as it is submitted."""

    def __init__(
        self,
        ctx: Context,
        *,
        train_progress: Callable[[], Progress],
        score_progress: Callable[[], ScoreProgress],
    ) -> None:
        self.ctx = ctx
        apply_torch_threads(ctx.settings.torch_threads)
        self.device = resolve_device(ctx.settings.device)
        self.models = ModelCache(ctx, self.device)
        self.worker = f"inline-{os.getpid()}@{socket.gethostname()}"
        self._train_progress = train_progress
        self._score_progress = score_progress

    def enqueue_train(self, job_id: int) -> None:
        pass  # the job is found in SQL by after_submit

    def enqueue_shards(self, shard_ids: list[int]) -> None:
        pass

    def after_submit(self, job_id: int) -> None:
        try:
            self._run(job_id)
        except KeyboardInterrupt:
            # Nobody else will pick this job up: say so in SQL rather than leave it "running".
            with self.ctx.store.session() as session:
                end_job(session, job_id, status=JobStatus.FAILED, error="interrupted (Ctrl-C) in the submitting process")
            raise

    def _run(self, job_id: int) -> None:
        with self.ctx.store.session() as session:
            job = session.get_one(Job, job_id)
            kind, total = job.kind, job.n_total
        if kind == JobKind.TRAIN:
            run_train_job(self.ctx, job_id, progress=self._train_progress(), device=self.device)
            return
        with self.ctx.store.session() as session:
            shard_ids = list(
                session.scalars(
                    select(Shard.id).where(Shard.job_id == job_id, Shard.status == ShardStatus.QUEUED).order_by(Shard.seq)
                )
            )
        progress = self._score_progress()
        progress.start(total, f"{kind} job {job_id}")
        try:
            for shard_id in shard_ids:
                outcome = ShardOutcome.RETRY
                while outcome is ShardOutcome.RETRY:
                    outcome = run_shard(
                        self.ctx, shard_id, models=self.models, worker=self.worker, on_batch=progress.advance
                    )
        finally:
            progress.stop()


def make_dispatcher(
    ctx: Context,
    *,
    train_progress: Callable[[], Progress],
    score_progress: Callable[[], ScoreProgress],
) -> Dispatcher:
    if ctx.settings.embedded:
        return InlineDispatcher(ctx, train_progress=train_progress, score_progress=score_progress)
    from workers.producer import CeleryDispatcher  # the queue side, only when a broker is set

    return CeleryDispatcher(ctx.settings)
