"""Terminal progress bars (on stderr): in-process runs, and `--wait` polling a queued job."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy.exc import InterfaceError, OperationalError

from adqueue.cli.output import stderr_console
from adqueue.core.clock import utcnow
from adqueue.core.errors import DatabaseUnreachable, JobStalled
from adqueue.jobs.context import Context
from adqueue.store.models import JobStatus
from adqueue.store.queries import job_summary, live_leases

MIN_RETRY_S = 0.5  # the first pause after the database stops answering; doubled up to MAX_RETRY_S
MAX_RETRY_S = 5.0


def _bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=stderr_console(),
        transient=False,
    )


class TrainBar:
    """Implements the detectors' Progress protocol: one bar per phase."""

    def __init__(self) -> None:
        self._progress = _bar()
        self._task: TaskID | None = None
        self._progress.start()

    def phase(self, name: str, total: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=self._progress.tasks[-1].total)
        self._task = self._progress.add_task(name, total=total or None, info="")

    def advance(self, n: int = 1, **info: float) -> None:
        if self._task is not None:
            text = " ".join(f"{key}={value:.4g}" for key, value in info.items())
            if text:
                self._progress.update(self._task, advance=n, info=text)
            else:
                self._progress.update(self._task, advance=n)

    def stop(self) -> None:
        self._progress.stop()


class ScoreBar:
    def __init__(self) -> None:
        self._progress = _bar()
        self._task: TaskID | None = None

    def start(self, total: int, description: str) -> None:
        self._progress.start()
        self._task = self._progress.add_task(description, total=total or None, info="")

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=n)

    def stop(self) -> None:
        self._progress.stop()


def wait_for_job(ctx: Context, job_id: int, *, poll_s: float = 0.5, timeout_s: float | None = None) -> dict:
    """Follow a queued job in SQL until it ends; returns its summary.

    Never forever: with no progress and no live lease anywhere (no worker working on anything)
    for `stall_after_s`, it raises JobStalled with the command to run. The database may go away
    meanwhile (a restart): it says so once, tries again with a growing pause, says once that it
    is back, and gives up (DatabaseUnreachable, exit status 4) only when it stays away for longer
    than `stall_after_s`. Ctrl-C stops following only: the job goes on in the workers."""
    try:
        return _follow(ctx, job_id, poll_s=poll_s, timeout_s=timeout_s)
    except KeyboardInterrupt:
        stderr_console().print(f"stopped following job {job_id}; it goes on in the workers (adqueue jobs {job_id})")
        raise


class _Contact:
    """Whether the database answers, said once when it stops and once when it answers again."""

    def __init__(self, console: Console, job_id: int, give_up_after_s: float) -> None:
        self.console = console
        self.job_id = job_id
        self.give_up_after_s = give_up_after_s
        self.lost_at: float | None = None
        self.delay = 0.0

    def lost(self, exc: Exception) -> float:
        """Note a failed poll; returns how long to wait before the next."""
        now = time.monotonic()
        if self.lost_at is None:
            self.lost_at, self.delay = now, MIN_RETRY_S
            reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0][:200]
            self.console.print(f"lost contact with the database ({reason}); job {self.job_id} goes on in the "
                               "workers, trying again")
        elif now - self.lost_at > self.give_up_after_s:
            raise DatabaseUnreachable(
                f"the database has not answered for {now - self.lost_at:.0f} s; job {self.job_id} may still be "
                f"running in the workers: `adqueue jobs {self.job_id}` once it is back") from None
        else:
            self.delay = min(self.delay * 2, MAX_RETRY_S)
        return self.delay

    def answered(self) -> bool:
        """A poll succeeded; True if it had been lost (the stall clock starts again)."""
        if self.lost_at is None:
            return False
        self.console.print(f"the database is back after {time.monotonic() - self.lost_at:.0f} s")
        self.lost_at = None
        return True


def _follow(ctx: Context, job_id: int, *, poll_s: float, timeout_s: float | None) -> dict:
    started = last_change = time.monotonic()
    seen: tuple = ()
    with _bar() as progress:
        task = progress.add_task(f"job {job_id}", total=None, info="")
        contact = _Contact(progress.console, job_id, ctx.settings.stall_after_s)
        while True:
            try:
                with ctx.store.session() as session:
                    summary = job_summary(session, job_id)
                    working = live_leases(session, utcnow())
            except (OperationalError, InterfaceError) as exc:
                time.sleep(contact.lost(exc))
                continue
            if contact.answered():
                last_change = time.monotonic()  # workers were cut off too: give them a stall period
            total = summary["n_total"] or None
            done = summary["n_done"] + (summary["n_failed"] if summary["kind"] != "train" else 0)
            label = summary["phase"] if summary["kind"] == "train" and summary["phase"] else summary["status"]
            progress.update(task, total=total, completed=done, info=label or "",
                            description=f"{summary['kind']} job {job_id}")
            if summary["status"] in JobStatus.ENDED:
                return summary
            now = time.monotonic()
            state = (summary["status"], done, summary["phase"], summary["shards_done"], summary["shards_failed"])
            if state != seen or working:
                seen, last_change = state, now
            elif now - last_change > ctx.settings.stall_after_s:
                raise JobStalled(
                    f"job {job_id} ({summary['status']}) made no progress for {now - last_change:.0f} s and no "
                    f"worker holds a lease on any job: are workers running on queue {summary['queue']!r}? "
                    f"Then `adqueue resume {job_id}` sends its work again"
                )
            if timeout_s is not None and now - started > timeout_s:
                return summary
            time.sleep(poll_s)
