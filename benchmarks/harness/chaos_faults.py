"""Faults beyond dead processes and restarted servers: a full disk, poison queue entries, the
database away under `score --wait`, Redis killed mid-submission, a worker's cold shutdown.

Same deployment and the same outcome as harness/chaos.py (the job ends `done`, one row per file,
no shard written twice, within the bound); each scenario also checks what its fault is about and
turns the status into a sentence when that does not hold, so the table and the test both fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from adqueue.store.models import Job, Result, Run, RunKind, RunOutcome, Shard

from .chaos import NEEDS_TEXTURES_ROOT, POSTGRES_ONLY, SCENARIOS, ChaosDeployment, Outcome
from .cli import run_cli
from .servers import wait_until

HEATMAP_DISK = "40k"  # a few JPEG heat maps of 10-20 kB fit, then the disk is full
# How long PostgreSQL stays dead under `score --wait` (the night: 60 s; a test may shorten it).
PG_OUTAGE_S = float(os.environ.get("ADQUEUE_CHAOS_PG_OUTAGE", "60"))


def _failed_checks(outcome: Outcome, problems: list[str]) -> Outcome:
    if problems:
        outcome.status = f"{outcome.status} ({'; '.join(problems)})"
    return outcome


class Tmpfs:
    """A real tmpfs of `size` mounted on `folder` (as root), unmounted on exit."""

    def __init__(self, folder: Path, size: str) -> None:
        self.folder = folder
        self.size = size
        self.mounted = False

    def __enter__(self) -> Tmpfs:
        self.folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.folder)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PermissionError(f"mount -t tmpfs refused ({done.stderr.strip() or done.returncode}): "
                                  "a full disk needs root (or CAP_SYS_ADMIN)")
        self.mounted = True
        return self

    def __exit__(self, *_: object) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


def heatmap_disk_full(d: ChaosDeployment, dump_source: Path) -> Outcome:
    """`--heatmaps all` with the heat-map folder on a 40 kB tmpfs: the scores survive."""
    d.keep_pool()
    dump, files = d.dump(dump_source, 200)
    heatmaps = Path(d.env["ADQUEUE_DATA_DIR"]) / "heatmaps"
    with Tmpfs(heatmaps, HEATMAP_DISK):
        fault = time.monotonic()
        job = d.submit_score(dump, 20, heatmaps="all")
        ended = d.wait_end(job)
        outcome = d.outcome("heat-map disk full (40 kB tmpfs), --heatmaps all", job, files, fault, ended)
        pointed = set(d.query(lambda s: s.scalars(select(Result.heatmap_path).where(
            Result.job_id == job, Result.heatmap_path.is_not(None))).all()))
        on_disk = {str(p.relative_to(heatmaps.parent)) for p in (heatmaps / f"job{job}").rglob("*") if p.is_file()}
    row = d.job(job)
    disk_errors = d.query(lambda s: s.scalar(select(func.count()).select_from(Result).where(
        Result.job_id == job, Result.error.like("%No space left%"))))
    attempts = d.query(lambda s: s.scalar(select(func.max(Shard.attempts)).where(Shard.job_id == job)))
    orphans = len(on_disk - pointed)
    problems = [text for bad, text in (
        (disk_errors > 0, f"{disk_errors} error rows from the disk"),
        (orphans > 0, f"{orphans} orphan file(s)"),
        (row.n_heatmaps_unwritten == 0, "no unwritten heat map counted"),
        ("No space left" not in (row.unwritten_reason or ""), f"reason {row.unwritten_reason!r}"),
        ((attempts or 0) > 1, f"a shard ran {attempts} times"),
    ) if bad]
    outcome.bound_s = None  # the fault lasts the whole job: it ends when its work does
    outcome.note = (f"{len(pointed)} heat maps written, {row.n_heatmaps_unwritten} not ({row.unwritten_reason}); "
                    f"{orphans} orphans, each shard run {attempts or 0}x")
    return _failed_checks(outcome, problems)


def poison_messages(d: ChaosDeployment, dump_source: Path) -> Outcome:
    """`[1,2,3]` and a string that is not JSON pushed onto the queue while two workers run a job."""
    import redis

    job, files = d.score_until(dump_source, 240, 20, lambda c: c.get("done", 0) >= 1 and c.get("queued", 0) >= 2)
    client = redis.Redis.from_url(d.redis.url)
    queue = d.env["ADQUEUE_QUEUE"]
    client.delete(f"{queue}.dead")
    fault, fault_utc = time.monotonic(), datetime.now(UTC)
    client.lpush(queue, "[1,2,3]")
    client.lpush(queue, "this is not json")
    ended = d.wait_end(job)
    # Pushed behind the job's own messages, the poison is taken last: the job can end while the
    # workers are still on their way to it (seen on a fast machine, 1.4 s from push to end).
    with contextlib.suppress(TimeoutError):  # reported below, with whatever did arrive
        wait_until(lambda: client.llen(f"{queue}.dead") >= 2, 30, "the poison in the dead-letter list", interval=0.05)
    dead = sorted(raw.decode() for raw in client.lrange(f"{queue}.dead", 0, -1))
    alive = len(d.live_workers())
    reconciled = run_cli(["reconcile", "--format", "json"], d.env, check=False)
    report = json.loads(reconciled.stdout) if reconciled.returncode == 0 else {}
    problems = [text for bad, text in (
        (alive < 2, f"{2 - alive} worker(s) died"),
        (dead != ["[1,2,3]", "this is not json"] and dead != ["[1, 2, 3]", "this is not json"],
         f"dead letters {dead}"),
        (reconciled.returncode != 0, f"reconcile exited {reconciled.returncode}: {reconciled.stderr[-300:]}"),
    ) if bad]
    # Nothing to heal: the bound is on any delay beyond the scoring still owed when they were pushed.
    work = d.busy_seconds(job, fault_utc)
    outcome = d.outcome("poison queue entries ([1,2,3], not JSON)", job, files, fault, ended, work_s=work,
                        note=f"{alive} workers alive after; {len(dead)} entries in {queue}.dead; "
                             f"reconcile exit {reconciled.returncode}, dead_letters={report.get('dead_letters')}")
    client.delete(f"{queue}.dead")
    return _failed_checks(outcome, problems)


def postgres_away_under_wait(d: ChaosDeployment, dump_source: Path) -> Outcome:
    """PostgreSQL SIGKILLed while `adqueue score --wait` follows the job, started again later."""
    assert d.postgres is not None, "PostgreSQL only"
    d.keep_pool()
    dump, files = d.dump(dump_source, 240)
    # The stall timeout of a production lease (2 x 60 s + 30 s) outlasts the outage, as it would at night.
    waiter = d.adqueue("score", "--model", "chaos", str(dump), "--shard-size", "20", "--wait",
                       env={**d.env, "ADQUEUE_STALL_TIMEOUT": str(PG_OUTAGE_S + 90)})
    job = wait_until(lambda: d.query(lambda s: s.scalar(select(func.max(Job.id)).where(
        Job.source == str(dump.resolve())))), 60, "the job", interval=0.05)
    d.wait_shards(job, lambda c: c.get("done", 0) >= 1)
    fault, fault_utc = time.monotonic(), datetime.now(UTC)
    d.postgres.kill()
    time.sleep(PG_OUTAGE_S)
    d.postgres.start()
    back = time.monotonic()
    d.ctx.store.dispose()
    _, stderr = waiter.communicate(timeout=300)
    ended = d.wait_end(job)
    lost = stderr.count("lost contact with the database")
    regained = stderr.count("the database is back")
    problems = [text for bad, text in (
        (waiter.returncode != 0, f"--wait exited {waiter.returncode}: {stderr.strip().splitlines()[-1:]}"),
        (lost != 1 or regained != 1, f"said lost {lost}x, back {regained}x"),
    ) if bad]
    work = d.busy_seconds(job, fault_utc)  # most of the job's scoring comes after the outage
    outcome = d.outcome(f"PostgreSQL SIGKILLed {PG_OUTAGE_S:.0f} s under score --wait", job, files, fault, ended,
                        healer_from=back, work_s=work,
                        note=f"--wait exit {waiter.returncode}; said lost {lost}x, back {regained}x; "
                             f"{work:.1f} s of scoring after it")
    return _failed_checks(outcome, problems)


def redis_killed_mid_submission(d: ChaosDeployment, dump_source: Path) -> Outcome:
    """Redis SIGKILLed after the first commit of a submission, before its shards are sent."""
    d.keep_pool()
    dump, files = d.dump(dump_source, 254)  # + 2 broken files: 128 shards of 2, written 64 per commit
    submitter = d.adqueue("score", "--model", "chaos", str(dump), "--shard-size", "2",
                          env={**d.env, "ADQUEUE_FAILPOINT": "submit.after_commit@1=stop"})
    job = wait_until(lambda: d.query(lambda s: s.scalar(select(func.max(Job.id)).where(
        Job.source == str(dump.resolve())))), 60, "the job", interval=0.05)
    wait_until(lambda: Path(f"/proc/{submitter.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
               60, "the submitter to stop after its first commit", interval=0.05)
    fault = time.monotonic()
    assert d.redis.process is not None
    d.redis.process.kill()
    d.redis.process.wait(10)
    submitter.send_signal(signal.SIGCONT)
    _, stderr = submitter.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    d.redis.start()
    run_cli(["resume", str(job)], d.env)
    ended = d.wait_end(job)
    problems = [text for bad, text in (
        (submitter.returncode == 0, "the submission exited 0"),
        (len(lines) != 1 or f"adqueue resume {job}" not in stderr, f"stderr {len(lines)} lines: {lines[-2:]}"),
    ) if bad]
    outcome = d.outcome("Redis SIGKILLed mid-submission, then resume", job, files, fault, ended,
                        note=f"exit {submitter.returncode}, {len(lines)} line on stderr; resumed")
    outcome.bound_s = None  # ends when `resume` has sent and the workers scored everything
    return _failed_checks(outcome, problems)


def cold_shutdown_mid_shard(d: ChaosDeployment, dump_source: Path) -> Outcome:
    """SIGQUIT (Celery's cold shutdown) to a worker running a shard: released, attempt not counted."""
    job, files = d.score_until(dump_source, 240, 40, lambda c: c.get("running", 0) >= 1 and c.get("done", 0) >= 1)
    victim = d.worker_holding(job)
    name = f"%:{victim.process.pid}"
    fault = time.monotonic()
    os.kill(victim.process.pid, signal.SIGQUIT)
    exit_status = victim.process.wait(60)
    d.keep_pool()
    ready = time.monotonic()
    ended = d.wait_end(job)
    runs = d.query(lambda s: s.execute(select(Run.outcome, Run.error).where(
        Run.job_id == job, Run.kind == RunKind.SHARD, Run.worker.like(name),
        Run.outcome.not_in((RunOutcome.DONE,)))).all())
    counted = [error for outcome, error in runs if outcome != RunOutcome.INTERRUPTED]
    max_attempts = d.query(lambda s: s.scalar(select(func.max(Shard.attempts)).where(Shard.job_id == job)))
    problems = [text for bad, text in (
        (not runs, "no run of the stopped worker was interrupted"),
        (bool(counted), f"counted: {counted[:1]}"),
        ((max_attempts or 0) > 1, f"a shard counted {max_attempts} attempts"),
    ) if bad]
    outcome = d.outcome("SIGQUIT (cold shutdown) to a worker mid-shard", job, files, fault, ended,
                        healer_from=ready, note=f"worker exit {exit_status}; {len(runs)} run(s) interrupted, "
                                                f"attempts at most {max_attempts}")
    return _failed_checks(outcome, problems)


FAULTS: dict[str, Callable[[ChaosDeployment, Path], Outcome]] = {
    "heatmap_disk_full": heatmap_disk_full,
    "poison": poison_messages,
    "postgres_wait": postgres_away_under_wait,
    "redis_submission": redis_killed_mid_submission,
    "cold_shutdown": cold_shutdown_mid_shard,
}
ALL_SCENARIOS = {**SCENARIOS, **FAULTS}
ALL_POSTGRES_ONLY = POSTGRES_ONLY | {"postgres_wait"}
ALL_NEEDS_TEXTURES_ROOT = NEEDS_TEXTURES_ROOT
NEEDS_ROOT = {"heatmap_disk_full"}  # mounts a tmpfs
