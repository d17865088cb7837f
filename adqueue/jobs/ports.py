"""Where submitted work goes: to Celery through Redis, or straight into this process.

The embedded default (no broker) runs the very same `run_train_job` / `run_shard` / `run_finish`
functions a worker runs, in order, right after submission (or `resume`), with progress shown in
the terminal. SIGTERM, SIGHUP and SIGINT stop such a run cleanly: the job is marked failed with
the `adqueue resume` command that completes it, its open shards are queued again, and the
interrupted attempt is not counted.

This module imports nothing that computes: the submitting and reconciling code imports it, also
with a broker. What trains and scores (torch and all) is imported once a job runs here.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any, Protocol

from sqlalchemy import select

from adqueue.core.errors import Interrupted
from adqueue.core.progress import Progress
from adqueue.jobs.context import Context
from adqueue.jobs.control import interruptions_marked
from adqueue.jobs.finishing import run_finish
from adqueue.pipeline.model_files import ModelCache, apply_torch_threads, resolve_device
from adqueue.store.models import Job, JobKind, Shard, ShardStatus


class Dispatcher(Protocol):
    """Sends work to whoever runs it. `queue` is the Celery queue, None in this process."""

    queue: str | None

    def enqueue_train(self, job_id: int) -> None: ...

    def enqueue_shards(self, shard_ids: Sequence[int], *, countdown: float = 0.0) -> None: ...

    def enqueue_finish(self, job_id: int) -> None: ...

    def after_submit(self, job_id: int) -> None: ...


class ScoreProgress(Protocol):
    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def stop(self) -> None: ...


class NullScoreProgress:
    """No terminal bar (benchmarks, `adqueue reconcile`)."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


class InlineDispatcher:
    """Runs each job in this process as soon as it is submitted or resumed.

    Torch is imported, its threads capped and the device resolved on first use of `device` (the
    first training or shard), so one built only to finish an evaluation (`adqueue reconcile`)
    never imports it; `make_dispatcher` resolves the device at once, so that a bad `--device`
    fails before a job is submitted."""

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
        from adqueue.pipeline.score import ShardOutcome, run_shard  # torch: only when a job runs here
        from adqueue.pipeline.train import run_train_job

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
                outcome = ShardOutcome.RETRY
                while outcome is ShardOutcome.RETRY:
                    raise_if_signalled()
                    outcome = run_shard(self.ctx, shard_id, models=self.models, worker=self.worker, dispatcher=self,
                                        on_batch=progress.advance)
                if outcome in (ShardOutcome.LOST, ShardOutcome.JOB_FAILED):
                    break  # cancelled from elsewhere, or a permanent error failed the job
        finally:
            self._in_shard_loop = False
            progress.stop()
        if job_id in self._finish_due:
            raise_if_signalled()
            self._finish_due.discard(job_id)
            run_finish(self.ctx, job_id, worker=self.worker)


_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


# The signal last received inside signals_interrupt(). Its exception can be lost: raised in the
# middle of a database driver's call, it can be replaced by the driver's own error on the way out
# (psycopg: "can't change 'autocommit' now") and then handled as a failed shard. The shard loop
# checks this between shards, so the run still stops.
_received: int | None = None


def _raise_interrupted(signum: int, _frame: Any) -> None:
    global _received
    _received = signum
    raise Interrupted(signum, _SIGNALS.get(signum, str(signum)))


def raise_if_signalled() -> None:
    """Raise Interrupted if a signal arrived inside signals_interrupt() whose exception was lost."""
    if _received is not None:
        raise Interrupted(_received, _SIGNALS.get(_received, str(_received)))


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted here, as Ctrl-C raises KeyboardInterrupt, so a job
    running in this process is marked for `resume` on the way out rather than left `running`."""
    global _received
    _received = None
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in _SIGNALS}
    try:
        yield
    finally:
        _received = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def make_dispatcher(
    ctx: Context,
    *,
    train_progress: Callable[[], Progress],
    score_progress: Callable[[], ScoreProgress],
) -> Dispatcher:
    if ctx.settings.embedded:
        inline = InlineDispatcher(ctx, train_progress=train_progress, score_progress=score_progress)
        inline.device  # noqa: B018 - a device that is not there fails now, before anything is submitted
        return inline
    from adqueue.workers.producer import CeleryDispatcher  # the queue side, only when a broker is set

    return CeleryDispatcher(ctx.settings)
