"""Faults done for real against a real deployment, and what SQL says afterwards.

Each scenario submits a job to a deployment of real processes (its own redis-server, SQLite or a
restartable PostgreSQL, `adqueue worker` processes), does one fault (SIGKILL, a server restart, a
crash at an exact point through a failpoint, SIGTERM, cancel) and waits, without touching
anything, for the job to end. `benchmarks/chaos.py` prints the outcomes as a table;
`tests/integration/test_chaos.py` asserts them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from adqueue.core.config import Settings
from adqueue.jobs.context import Context
from adqueue.store import summaries
from adqueue.store.models import Job, JobStatus, Result, Run, RunKind, RunOutcome, Shard, ShardStatus

from .cli import FAST_MVG, cli_env, run_cli
from .servers import REPO, PostgresServer, RedisServer, Worker, create_database, wait_until

LEASE_S = 6.0
INTERVAL_S = 1.5
VISIBILITY_S = 3  # low, so long shards are redelivered while their worker is alive
BOUND_S = 2 * LEASE_S + INTERVAL_S  # the promise: a job ends this long after a fault (plus scoring still owed)


@dataclass
class Outcome:
    scenario: str
    database: str
    status: str
    files: int
    rows: int
    distinct_paths: int
    double_completions: int  # shards closed by more than one run, plus rows not written by the closing run
    seconds: float  # from the fault to the job's end
    bound_s: float | None  # what `seconds` must stay within (from when a worker was there to heal it)
    note: str = ""
    started: bool = True  # jobs.started_at is set
    heatmap_faults: int = 0  # rows whose heat map is missing or another run's file
    summary_matches: bool = True  # the job's summary equals a rebuild from its rows

    @property
    def in_time(self) -> bool:
        return self.bound_s is None or self.seconds <= self.bound_s

    @property
    def ok(self) -> bool:
        return (self.status == JobStatus.DONE and self.rows == self.distinct_paths == self.files
                and self.double_completions == 0 and self.in_time and self.started and self.heatmap_faults == 0
                and self.summary_matches)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


class ChaosDeployment:
    """Redis (persistent, restartable), a database, a data dir, a trained model and two workers."""

    def __init__(self, folder: Path, *, postgres: PostgresServer | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.database = "postgres" if postgres else "sqlite"
        self.postgres = postgres
        self.redis = RedisServer(persist=True)
        url = (create_database(postgres.url, f"chaos_{uuid.uuid4().hex[:8]}") if postgres
               else f"sqlite:///{folder / 'chaos.db'}")
        self.env = cli_env(
            ADQUEUE_DATA_DIR=str(folder / "data"), ADQUEUE_DATABASE_URL=url, ADQUEUE_BROKER_URL=self.redis.url,
            ADQUEUE_QUEUE="chaos", ADQUEUE_LEASE=str(LEASE_S), ADQUEUE_RECONCILE_INTERVAL=str(INTERVAL_S),
            ADQUEUE_VISIBILITY_TIMEOUT=str(VISIBILITY_S), ADQUEUE_RETRY_DELAY="0.5", ADQUEUE_BATCH_SIZE="2",
        )
        self.ctx = Context(Settings.load(data_dir=folder / "data", database_url=url, broker_url=""))
        self.workers: list[Worker] = []
        self._logs = 0

    # --- set-up ---------------------------------------------------------------------------------

    def train(self, textures: Path) -> None:
        run_cli(["train", "--data", str(textures), "--name", "chaos", *FAST_MVG], self.embedded_env())

    def embedded_env(self) -> dict[str, str]:
        return {**self.env, "ADQUEUE_BROKER_URL": ""}

    def dump(self, source: Path, n_images: int) -> tuple[Path, int]:
        """A dump of `n_images` real images (hard links under distinct names) plus the source's
        broken files; returns it and its file count."""
        folder = self.folder / f"dump-{uuid.uuid4().hex[:6]}"
        folder.mkdir()
        images = sorted(p for p in source.glob("*.png") if "corrupt" not in p.name)
        for index in range(n_images):
            os.link(images[index % len(images)], folder / f"img_{index:05d}.png")
        for broken in [p for p in source.iterdir() if p not in images]:
            shutil.copy(broken, folder / broken.name)
        return folder, sum(1 for _ in folder.iterdir())

    def start_workers(self, count: int, **env: str) -> list[Worker]:
        started = []
        for _ in range(count):
            self._logs += 1
            started.append(Worker({**self.env, **env}, self.folder / f"worker{self._logs}.log"))
        for worker in started:
            worker.wait_ready()
        self.workers += started
        return started

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.process.poll() is None]

    def stop_workers(self) -> None:
        for worker in self.live_workers():
            worker.stop()

    def keep_pool(self, size: int = 2) -> None:
        """Back to `size` live workers after a scenario that killed some."""
        missing = size - len(self.live_workers())
        if missing > 0:
            self.start_workers(missing)

    def close(self) -> None:
        self.stop_workers()
        self.redis.close()
        self.ctx.close()

    # --- driving jobs ---------------------------------------------------------------------------

    def adqueue(self, *args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "adqueue", *args], env=env or self.env, cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)

    def submit_score(self, dump: Path, shard_size: int, heatmaps: str = "all") -> int:
        """Submitted from this process, through the job code the CLI calls: it returns the moment
        the shards are queued, so a scenario can watch the job from its very start."""
        from adqueue.jobs.submit import submit_score
        from adqueue.workers.producer import CeleryDispatcher

        settings = Settings.load(data_dir=self.env["ADQUEUE_DATA_DIR"], database_url=self.env["ADQUEUE_DATABASE_URL"],
                                 broker_url=self.env["ADQUEUE_BROKER_URL"], queue=self.env["ADQUEUE_QUEUE"])
        return submit_score(self.ctx, CeleryDispatcher(settings), model="chaos", data=str(dump),
                            shard_size=shard_size, heatmaps=heatmaps).job_id

    def score_until(self, dump_source: Path, n_images: int, shard_size: int,
                    until: Callable[[dict[str, int]], bool]) -> tuple[int, int]:
        """With the pool up, submit a dump of `n_images` and wait until its shard counts satisfy
        `until`: the moment to do the fault. Returns the job and its file count."""
        self.keep_pool()
        dump, files = self.dump(dump_source, n_images)
        job = self.submit_score(dump, shard_size)
        self.wait_shards(job, until)
        return job, files

    def submit_evaluate(self, root: Path, shard_size: int) -> int:
        done = run_cli(["evaluate", "--model", "chaos", "--data", str(root), "--shard-size", str(shard_size)], self.env)
        return int(done.stdout.split()[0])

    def query(self, statement: Callable) -> object:
        with self.ctx.store.session() as session:
            return statement(session)

    def job(self, job_id: int) -> Job:
        return self.query(lambda s: s.get_one(Job, job_id, populate_existing=True))

    def shard_counts(self, job_id: int) -> dict[str, int]:
        return dict(self.query(lambda s: s.execute(
            select(Shard.status, func.count()).where(Shard.job_id == job_id).group_by(Shard.status)).all()))

    def wait_shards(self, job_id: int, what: Callable[[dict[str, int]], bool], timeout: float = 120) -> None:
        """Until the job's shard counts satisfy `what`: the moment for a fault."""
        deadline = time.monotonic() + timeout
        while not what(self.shard_counts(job_id)):
            if self.job(job_id).status in JobStatus.ENDED:  # too late for this fault: say so at once
                raise AssertionError(f"job {job_id} ended before the moment for the fault came")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}'s shards never reached the moment for the fault")
            time.sleep(0.02)

    def wait_end(self, job_id: int, timeout: float = 180) -> float:
        wait_until(lambda: self.job(job_id).status in JobStatus.ENDED, timeout, f"job {job_id} to end", interval=0.1)
        return time.monotonic()

    def worker_holding(self, job_id: int) -> Worker:
        """A worker process running one of the job's shards right now."""
        def holder() -> Worker | None:
            names = self.query(lambda s: s.scalars(select(Shard.worker).where(
                Shard.job_id == job_id, Shard.status == ShardStatus.RUNNING)).all())
            pids = {int(str(name).rsplit(":", 1)[1]) for name in names}
            return next((w for w in self.live_workers() if w.process.pid in pids), None)

        return wait_until(holder, 60, f"a worker running a shard of job {job_id}", interval=0.02)

    def busy_seconds(self, job_id: int, since: datetime) -> float:
        """The busiest worker's time spent running this job's shards that started after `since`:
        the scoring itself, which no recovery can save when all of a job's work comes after a fault."""
        def runs(session) -> list:
            return session.execute(select(Run.worker, Run.started_at, Run.ended_at).where(
                Run.job_id == job_id, Run.kind == RunKind.SHARD, Run.ended_at.is_not(None))).all()

        def utc(moment: datetime) -> datetime:
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

        busy: dict[str, float] = {}
        for worker, started, ended in self.query(runs):
            if utc(started) >= since:
                busy[worker] = busy.get(worker, 0.0) + (utc(ended) - utc(started)).total_seconds()
        return max(busy.values(), default=0.0)

    def outcome(self, scenario: str, job_id: int, files: int, fault_at: float, ended_at: float, *,
                healer_from: float | None = None, work_s: float = 0.0, note: str = "") -> Outcome:
        def count(session) -> tuple[int, int, int]:
            rows, distinct = session.execute(select(func.count(), func.count(Result.path.distinct()))
                                             .where(Result.job_id == job_id)).one()
            twice = session.scalar(select(func.count()).select_from(
                select(Run.shard_id).where(Run.job_id == job_id, Run.kind == RunKind.SHARD,
                                           Run.outcome.in_((RunOutcome.DONE, RunOutcome.FAILED)))
                .group_by(Run.shard_id).having(func.count() > 1).subquery()))
            foreign = session.scalar(select(func.count()).select_from(Result).join(Shard, Shard.id == Result.shard_id)
                                     .where(Result.job_id == job_id, Result.run_id != Shard.run_id))
            return rows, distinct, twice + foreign

        def summary_matches(session) -> bool:
            kept = summaries.stored(session, job_id)
            rebuilt = summaries.rebuild(session, job_id)
            return kept is not None and kept.job == rebuilt.job and kept.shards == rebuilt.shards

        rows, distinct, doubles = self.query(count)
        start = max(fault_at, healer_from or fault_at)
        job = self.job(job_id)
        return Outcome(scenario, self.database, job.status, files, rows, distinct, doubles,
                       round(ended_at - fault_at, 1), round(BOUND_S + (start - fault_at) + work_s, 1), note,
                       started=job.started_at is not None, heatmap_faults=self.heatmap_faults(job_id),
                       summary_matches=bool(self.query(summary_matches)))

    def heatmap_faults(self, job_id: int) -> int:
        """Rows whose heat map file is missing, or is not their own run's (a run that lost its
        lease must never have replaced it)."""
        rows = self.query(lambda s: s.execute(select(Result.heatmap_path, Result.run_id).where(
            Result.job_id == job_id, Result.heatmap_path.is_not(None))).all())
        data = Path(self.env["ADQUEUE_DATA_DIR"])
        return sum(1 for path, run_id in rows
                   if not (data / path).is_file() or not Path(path).stem.endswith(f"-run{run_id}"))


# --- the scenarios ---------------------------------------------------------------------------------


def kill_one_worker_mid_shard(d: ChaosDeployment, dump_source: Path) -> Outcome:
    job, files = d.score_until(dump_source, 240, 40,  # the last shards run
                               lambda c: c.get("running", 0) >= 1 and c.get("queued", 0) == 0)
    victim = d.worker_holding(job)
    fault = time.monotonic()
    victim.kill()
    name = f"{victim.log.stem}"
    held = d.query(lambda s: s.scalar(select(func.count()).where(  # was it still running a shard?
        Shard.job_id == job, Shard.status == ShardStatus.RUNNING, Shard.worker.like(f"%:{victim.process.pid}"))))
    ended = d.wait_end(job)
    return d.outcome("SIGKILL one worker mid-shard", job, files, fault, ended,
                     note=f"{name} held {held} running shard(s) when killed")


def kill_all_workers(d: ChaosDeployment, dump_source: Path) -> Outcome:
    job, files = d.score_until(dump_source, 240, 40, lambda c: c.get("done", 0) >= 1 and c.get("running", 0) >= 1)
    fault = time.monotonic()
    for worker in d.live_workers():
        worker.kill()
    time.sleep(2.0)
    d.start_workers(2)
    ready = time.monotonic()
    ended = d.wait_end(job)
    return d.outcome("SIGKILL all workers, new ones started", job, files, fault, ended, healer_from=ready,
                     note=f"new workers ready {ready - fault:.1f} s after the kill")


def _redis_restart(d: ChaosDeployment, dump_source: Path, *, lose_data: bool) -> Outcome:
    job, files = d.score_until(dump_source, 240, 20, lambda c: c.get("done", 0) >= 2 and c.get("queued", 0) >= 3)
    fault = time.monotonic()
    d.redis.restart(lose_data=lose_data)
    ended = d.wait_end(job)
    name = "Redis restarted without its data (queue lost)" if lose_data else "Redis restarted with persistence"
    return d.outcome(name, job, files, fault, ended)


def redis_restart_persistent(d: ChaosDeployment, dump_source: Path) -> Outcome:
    return _redis_restart(d, dump_source, lose_data=False)


def redis_restart_queue_lost(d: ChaosDeployment, dump_source: Path) -> Outcome:
    return _redis_restart(d, dump_source, lose_data=True)


def postgres_restart(d: ChaosDeployment, dump_source: Path) -> Outcome:
    assert d.postgres is not None, "PostgreSQL only"
    job, files = d.score_until(dump_source, 240, 40, lambda c: c.get("done", 0) >= 1 and c.get("running", 0) >= 1)
    fault = time.monotonic()
    d.postgres.restart()
    ended = d.wait_end(job)
    return d.outcome("PostgreSQL restarted mid-job", job, files, fault, ended)


def shard_outlives_visibility_timeout(d: ChaosDeployment, dump_source: Path) -> Outcome:
    """One shard that runs over three visibility timeouts while its worker is alive and renewing."""
    job, files = d.score_until(dump_source, 1000, 10_000, lambda c: c.get("running", 0) == 1)
    started = time.monotonic()
    ended = d.wait_end(job)
    (shard_id,) = d.query(lambda s: s.scalars(select(Shard.id).where(Shard.job_id == job)).all())
    deliveries = sum(w.log.read_text(errors="replace").count(f"shard {shard_id}: ") for w in d.workers)
    attempts = d.query(lambda s: s.get_one(Shard, shard_id).attempts)
    outcome = d.outcome("a shard outlives the visibility timeout 3x", job, files, started, ended,
                        note=f"ran {ended - started:.0f} s (timeout {VISIBILITY_S} s), {deliveries} deliveries, "
                             f"{attempts} attempt(s)")
    outcome.bound_s = None  # no fault to recover from: it ends when its work does
    if attempts != 1 or ended - started < 3 * VISIBILITY_S:
        outcome.status = f"{outcome.status} (attempts {attempts}, ran {ended - started:.1f} s)"
    return outcome


def _with_one_fault_worker(d: ChaosDeployment, failpoint: str, submit: Callable[[], int],
                           ) -> tuple[int, float, float, tuple[str, dict[str, int]]]:
    """Only a worker armed with `failpoint` runs the job; it dies there; a fresh pool heals it.
    Returns the job, when it died, when the pool was ready, and the job's state at the death."""
    d.stop_workers()
    (armed,) = d.start_workers(1, ADQUEUE_FAILPOINT=failpoint)
    job = submit()
    wait_until(lambda: armed.process.poll() is not None, 120, f"the worker to die at {failpoint}", interval=0.05)
    fault = time.monotonic()
    state = (d.job(job).status, d.shard_counts(job))
    d.start_workers(2)
    return job, fault, time.monotonic(), state


def kill_between_last_commit_and_finish(d: ChaosDeployment, dump_source: Path) -> Outcome:
    dump, files = d.dump(dump_source, 120)
    n_shards = -(-files // 30)
    job, fault, ready, state = _with_one_fault_worker(d, f"shard.committed@{n_shards}",
                                                      lambda: d.submit_score(dump, 30))
    assert state == (JobStatus.RUNNING, {"done": n_shards}), state  # every shard closed, the job not ended
    ended = d.wait_end(job)
    return d.outcome("worker killed between last shard's commit and job's end", job, files, fault, ended,
                     healer_from=ready, note=f"new workers ready {ready - fault:.1f} s after")


def kill_during_metrics(d: ChaosDeployment, textures: Path) -> Outcome:
    files = sum(1 for p in (textures / "test").rglob("*") if p.is_file())
    job, fault, ready, state = _with_one_fault_worker(d, "finish.metrics", lambda: d.submit_evaluate(textures, 5))
    assert state[0] == JobStatus.FINISHING, state
    ended = d.wait_end(job)
    names = d.query(lambda s: s.scalars(select(Run.id).where(Run.job_id == job, Run.kind == RunKind.FINISH)).all())
    from adqueue.store.models import Metric

    metric_names = d.query(lambda s: s.scalars(select(Metric.name).where(Metric.job_id == job)).all())
    duplicated = len(metric_names) - len(set(metric_names))
    outcome = d.outcome("worker killed while computing evaluate metrics", job, files, fault, ended,
                        healer_from=ready, note=f"{len(names)} finishing runs, {len(metric_names)} metrics "
                                                f"({duplicated} duplicated)")
    outcome.double_completions += duplicated
    return outcome


def submission_killed_half_way(d: ChaosDeployment, dump_source: Path) -> Outcome:
    d.keep_pool()
    dump, files = d.dump(dump_source, 254)  # + 2 broken files: 128 shards of 2, written 64 per commit
    submitter = d.adqueue("score", "--model", "chaos", str(dump), "--shard-size", "2",
                          env={**d.env, "ADQUEUE_FAILPOINT": "submit.after_commit@1"})
    submitter.communicate(timeout=120)
    fault, fault_utc = time.monotonic(), datetime.now(UTC)
    assert submitter.returncode == -signal.SIGKILL, submitter.returncode
    job = d.query(lambda s: s.scalar(select(func.max(Job.id))))
    written = sum(d.shard_counts(job).values())
    ended = d.wait_end(job)
    # Every file is scored after the fault: the bound is on the recovery, beyond that scoring.
    work = d.busy_seconds(job, fault_utc)
    return d.outcome("submission killed after half its shards", job, files, fault, ended,
                     work_s=work, note=f"{written} of {-(-files // 2)} shards written (none sent) when it died; "
                     f"{work:.1f} s of scoring after it")


def embedded_sigterm_then_resume(d: ChaosDeployment, dump_source: Path) -> Outcome:
    dump, files = d.dump(dump_source, 400)
    embedded = d.embedded_env()
    cli = d.adqueue("score", "--model", "chaos", str(dump), "--shard-size", "40", env=embedded)
    job = wait_until(lambda: d.query(lambda s: s.scalar(select(func.max(Job.id)).where(
        Job.source == str(dump.resolve())))), 60, "the job", interval=0.05)
    d.wait_shards(job, lambda c: c.get("done", 0) >= 2)
    fault, fault_utc = time.monotonic(), datetime.now(UTC)
    cli.send_signal(signal.SIGTERM)
    _, stderr = cli.communicate(timeout=60)
    stopped = d.job(job)
    assert cli.returncode == 128 + signal.SIGTERM, (cli.returncode, stderr[-2000:])
    assert stopped.status == JobStatus.FAILED and f"adqueue resume {job}" in (stopped.error or ""), stopped.error
    run_cli(["resume", str(job)], embedded)
    ended = d.wait_end(job)
    work = d.busy_seconds(job, fault_utc)  # `resume` scores the rest in this one process
    return d.outcome("SIGTERM to an embedded job, then resume", job, files, fault, ended, work_s=work,
                     note=f"exit {cli.returncode}; stopped at {stopped.n_done + stopped.n_failed}/{files}; "
                          f"{work:.1f} s of scoring after it")


def cancel_then_resume(d: ChaosDeployment, dump_source: Path) -> Outcome:
    from adqueue.jobs.control import cancel_job, resume_job
    from adqueue.workers.producer import CeleryDispatcher

    job, files = d.score_until(dump_source, 400, 40, lambda c: c.get("done", 0) >= 2 and c.get("running", 0) >= 1)
    fault = time.monotonic()
    cancel_job(d.ctx, job)
    cancelled = d.job(job)
    def rows() -> object:
        return d.query(lambda s: s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job)))

    rows_then = rows()
    time.sleep(3.0)  # the runs that held shards notice at their next batch and write nothing
    rows_later = rows()
    assert cancelled.status == JobStatus.CANCELLED and d.shard_counts(job).get("running", 0) == 0
    assert rows_later == rows_then, (rows_then, rows_later)
    settings = Settings.load(data_dir=d.env["ADQUEUE_DATA_DIR"], database_url=d.env["ADQUEUE_DATABASE_URL"],
                             broker_url=d.env["ADQUEUE_BROKER_URL"], queue="chaos")
    resume_job(d.ctx, CeleryDispatcher(settings), job)
    ended = d.wait_end(job)
    return d.outcome("cancel mid-job, then resume", job, files, fault, ended,
                     note=f"cancelled with {cancelled.n_done + cancelled.n_failed}/{files} done; no row written after")


SCENARIOS: dict[str, Callable[[ChaosDeployment, Path], Outcome]] = {
    "kill_one": kill_one_worker_mid_shard,
    "kill_all": kill_all_workers,
    "redis_persistent": redis_restart_persistent,
    "redis_lost": redis_restart_queue_lost,
    "postgres_restart": postgres_restart,
    "visibility": shard_outlives_visibility_timeout,
    "last_commit": kill_between_last_commit_and_finish,
    "metrics": kill_during_metrics,
    "submission": submission_killed_half_way,
    "embedded_sigterm": embedded_sigterm_then_resume,
    "cancel_resume": cancel_then_resume,
}
NEEDS_TEXTURES_ROOT = {"metrics"}  # the others score the dump of broken and good files
POSTGRES_ONLY = {"postgres_restart"}
