"""Keeping a run's lease alive from its own progress, and noticing when it is gone.

A run renews its lease as its work advances (a batch scored, a training step), never from a
background timer: a worker that hangs stops renewing just like one that died, and its work is
taken back. Renewal is one guarded UPDATE, at most once a second, so it costs nothing per image;
the same UPDATE is the check that makes a cancelled or taken-over run stop at its next batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from adqueue.core.clock import utcnow
from adqueue.core.progress import Progress
from adqueue.jobs.context import Context
from adqueue.store.transitions import ClaimedJob, renew_job_lease

RENEW_EVERY_S = 1.0
SLOW_STEP_FACTOR = 4  # a lease outlasts this many of the slowest steps the run has seen
DB_RETRY_S = 20.0  # how long a renewal waits out an unreachable database


class LeaseLost(Exception):
    """This run no longer holds its work (cancelled, or expired and taken over): it writes nothing."""


def lease_until(ctx: Context, slowest_step_s: float = 0.0, now: datetime | None = None) -> datetime:
    return (now or utcnow()) + timedelta(seconds=max(ctx.settings.lease_s, SLOW_STEP_FACTOR * slowest_step_s))


class Lease:
    """Call `touch()` after each step of work; it renews when due and raises LeaseLost if gone."""

    def __init__(self, ctx: Context, renew: Callable[[Session, datetime], bool], what: str) -> None:
        self.ctx = ctx
        self._renew = renew
        self.what = what
        self._last_step = self._last_renewal = time.monotonic()
        self.slowest_step_s = 0.0

    def touch(self, *, force: bool = False) -> None:
        now = time.monotonic()
        self.slowest_step_s = max(self.slowest_step_s, now - self._last_step)
        self._last_step = now
        if not force and now - self._last_renewal < RENEW_EVERY_S:
            return
        until = lease_until(self.ctx, self.slowest_step_s)
        if not self.ctx.store.transaction(lambda session: self._renew(session, until), retry_s=DB_RETRY_S):
            raise LeaseLost(f"{self.what} lost its lease (cancelled, or taken over after it expired)")
        self._last_renewal = now


class JobProgress:
    """A training's (or finishing's) Progress: its phase (and a training's counts) go to the job
    row with each lease renewal, and on to a terminal bar when one is given."""

    def __init__(self, ctx: Context, held: ClaimedJob, display: Progress | None = None, *, counts: bool = True) -> None:
        self.display = display
        self.counts = counts
        self.name, self.total, self.done = "", 0, 0
        self.info: dict[str, float] = {}
        self.lease = Lease(ctx, self._renew, f"job {held.job_id}")
        self.held = held

    def _renew(self, session: Session, until: datetime) -> bool:
        details = " ".join(f"{key}={value:.4g}" for key, value in self.info.items())
        phase = f"{self.name} {details}".strip()[:200]
        counts = {"n_total": self.total, "n_done": self.done} if self.counts else {}
        return renew_job_lease(session, self.held, until, phase=phase, **counts)

    def phase(self, name: str, total: int) -> None:
        self.name, self.total, self.done, self.info = name, total, 0, {}
        if self.display is not None:
            self.display.phase(name, total)
        self.lease.touch(force=True)

    def advance(self, n: int = 1, **info: Any) -> None:
        self.done += n
        self.info.update(info)
        if self.display is not None:
            self.display.advance(n, **info)
        self.lease.touch()
