"""Stopping a job that runs in this process (the embedded default) so that `resume` completes it.

SIGTERM and SIGHUP raise Interrupted inside `signals_interrupt()`, as Ctrl-C raises
KeyboardInterrupt; `interruptions_marked` turns either into a job marked failed with the
`adqueue resume` command that completes it, its open shards queued again and the interrupted
attempts not counted.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from adqueue.core.errors import Interrupted
from adqueue.jobs.context import Context
from adqueue.store.transitions import interrupt_job

_SIGNALS: dict[int, str] = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}

# The signal last received inside signals_interrupt(). Its exception can be lost: raised in the
# middle of a database driver's call, it can be replaced by the driver's own error on the way out.
# SQLAlchemy's pre-ping of a pooled PostgreSQL connection turns autocommit on, runs SELECT 1 and
# turns it off in a `finally`; interrupted there, psycopg refuses the last step ("can't change
# 'autocommit' now: connection in transaction status ACTIVE") and that error is what comes out.
# The shard loop checks this between shards, and interruptions_marked() takes any error raised
# after a signal for the signal's doing.
_received: int | None = None


def _raise_interrupted(signum: int, _frame: Any) -> None:
    global _received  # noqa: PLW0603 - a signal handler can only leave its note in module state
    _received = signum
    raise _interrupted(signum)


def signalled() -> bool:
    """Whether a signal arrived inside signals_interrupt() (a run's `stopping` check)."""
    return _received is not None


def raise_if_signalled() -> None:
    """Raise Interrupted if a signal arrived inside signals_interrupt() whose exception was lost."""
    if _received is not None:
        raise _interrupted(_received)


def _interrupted(signum: int) -> Interrupted:
    return Interrupted(signum, _SIGNALS.get(signum, str(signum)))


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted here, as Ctrl-C raises KeyboardInterrupt, so a job
    running in this process is marked for `resume` on the way out rather than left `running`."""
    global _received  # noqa: PLW0603 - see _raise_interrupted
    _received = None
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in _SIGNALS}
    try:
        yield
    except Exception as exc:
        if _received is None:
            raise
        raise _interrupted(_received) from exc  # the signal's, replaced on its way out
    finally:
        _received = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def interruptions_marked(ctx: Context, job_id: int) -> Iterator[None]:
    """A signal (Interrupted) or Ctrl-C while this process works on the job marks it for `resume`;
    so does any error raised once a signal has arrived (its Interrupted was replaced on the way)."""
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as exc:
        _mark(ctx, job_id, exc)
        raise
    except Exception as exc:
        if _received is None:
            raise
        stopped = _interrupted(_received)
        _mark(ctx, job_id, stopped)
        raise stopped from exc


def _mark(ctx: Context, job_id: int, exc: KeyboardInterrupt | Interrupted) -> None:
    mark_interrupted(ctx, job_id, exc.name if isinstance(exc, Interrupted) else "SIGINT (Ctrl-C)")
    exc.job_id = job_id  # type: ignore[union-attr]  # read by the CLI for its last line


def mark_interrupted(ctx: Context, job_id: int, signal_name: str) -> None:
    """The job stops as `failed` with the command that completes it; its open shards wait queued
    and the interrupted attempts are not counted."""
    error = f"interrupted by {signal_name}; `adqueue resume {job_id}` completes it"
    with ctx.store.session() as session:
        interrupt_job(session, job_id, error)
