"""One piece of work under a lease, the same way for a shard, a training and a finishing.

claim -> (gave up after too many attempts?) -> work -> done; a run that finds its lease gone
(cancelled, or expired and taken over) writes nothing and ends LOST; any other failure goes to
the run's own policy (a shard is retried, a training or finishing fails its job). Each kind of
work says only what differs: how it claims, what it does, how it gives up and fails.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from sqlalchemy.orm import Session

from adqueue.jobs.context import Context
from adqueue.jobs.leases import DB_RETRY_S, LeaseLost
from adqueue.store.models import JobStatus
from adqueue.store.transitions import ClaimedJob, end_job_run

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """What one delivery of a piece of work came to (a task's return value, a log line)."""

    DONE = "done"
    RETRY = "retry"  # released for another attempt (its message is already sent)
    FAILED = "failed"  # gave up (after max attempts), or the training / finishing failed
    SKIPPED = "skipped"  # closed, or held by a live run: a duplicate delivery
    LOST = "lost"  # the lease was lost mid-run (cancelled, or expired and taken over): nothing written
    JOB_FAILED = "job_failed"  # a permanent error (the model file) failed the whole job
    INTERRUPTED = "interrupted"  # the process is shutting down: released, the attempt not counted


class Held(Protocol):
    """A claimed piece of work: the run holding it and how many runs it has had."""

    @property
    def run_id(self) -> int: ...

    @property
    def attempts(self) -> int: ...


H = TypeVar("H", bound=Held)


class LeasedRun(ABC, Generic[H]):
    """The sequence every leased piece of work follows; subclasses fill in its steps."""

    def __init__(self, ctx: Context, *, stopping: Callable[[], bool] | None = None) -> None:
        self.ctx = ctx
        # Whether this process is being shut down: an exception then is the shutdown's doing (a
        # worker's cold shutdown raises into the running task), not a failed attempt.
        self.stopping = stopping or (lambda: False)

    @abstractmethod
    def claim(self, session: Session) -> H | None:
        """Take the work (None: closed, or held by a live run)."""

    @abstractmethod
    def work(self, held: H) -> Outcome:
        """Do it; raise LeaseLost when the lease turns out to be gone."""

    @abstractmethod
    def give_up(self, held: H, error: str) -> Outcome:
        """Close the work as failed for good."""

    def give_up_reason(self, held: H) -> str:
        return f"gave up after {held.attempts - 1} attempt(s)"

    def skipped(self) -> None:
        """A duplicate delivery claimed nothing."""

    def lost(self, held: H, exc: LeaseLost) -> None:
        """The lease was lost: nothing was written."""
        log.warning("%s", exc)

    @abstractmethod
    def failed(self, held: H, exc: Exception) -> Outcome:
        """Any other failure: retry, or fail."""

    def interrupted(self, held: H) -> None:
        """A signal or Ctrl-C stopped this process mid-work (the embedded default)."""

    def completed(self, held: H) -> None:
        """After the work is done and committed; outside the work's error handling, so that a crash
        here is a crash, not a failed attempt."""

    def run(self) -> Outcome:
        held = self.ctx.store.transaction(self.claim, retry_s=DB_RETRY_S)
        if held is None:
            self.skipped()
            return Outcome.SKIPPED
        if held.attempts > self.ctx.settings.max_attempts:
            return self.give_up(held, self.give_up_reason(held))
        try:
            outcome = self.work(held)
        except LeaseLost as exc:
            self.lost(held, exc)
            return Outcome.LOST
        except Exception as exc:  # noqa: BLE001 - recorded by the run's own policy, never lost in a log only
            if self.stopping():
                log.warning("stopped by a shutdown (%s: %s); this attempt is not counted", type(exc).__name__, exc)
                self.interrupted(held)
                return Outcome.INTERRUPTED
            return self.failed(held, exc)
        except BaseException:
            self.interrupted(held)
            raise
        if outcome is Outcome.DONE:
            self.completed(held)
        return outcome


class JobRun(LeasedRun[ClaimedJob]):
    """A job-level run (a training, a finishing): giving up on it, or its failure, ends the job."""

    def __init__(self, ctx: Context, job_id: int, *, worker: str) -> None:
        super().__init__(ctx)
        self.job_id = job_id
        self.worker = worker

    def give_up(self, held: ClaimedJob, error: str) -> Outcome:
        return self.fail_job(held, error)

    def fail_job(self, held: ClaimedJob, error: str) -> Outcome:
        with self.ctx.store.session() as session:
            end_job_run(session, held, status=JobStatus.FAILED, error=error)
        return Outcome.FAILED
