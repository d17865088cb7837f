"""Terminal progress bars (on stderr): in-process runs, and `--wait` polling a queued job."""

from __future__ import annotations

import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from adqueue.cli.output import stderr_console
from adqueue.core.clock import utcnow
from adqueue.core.errors import JobStalled
from adqueue.jobs.context import Context
from adqueue.store.models import JobStatus
from adqueue.store.queries import job_summary, live_leases


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
    for `stall_after_s`, it raises JobStalled with the command to run. Ctrl-C stops following
    only: the job goes on in the workers."""
    try:
        return _follow(ctx, job_id, poll_s=poll_s, timeout_s=timeout_s)
    except KeyboardInterrupt:
        stderr_console().print(f"stopped following job {job_id}; it goes on in the workers (adqueue jobs {job_id})")
        raise


def _follow(ctx: Context, job_id: int, *, poll_s: float, timeout_s: float | None) -> dict:
    started = last_change = time.monotonic()
    seen: tuple = ()
    with _bar() as progress:
        task = progress.add_task(f"job {job_id}", total=None, info="")
        while True:
            with ctx.store.session() as session:
                summary = job_summary(session, job_id)
                working = live_leases(session, utcnow())
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
