"""How fast the CLI answers and how fast a dump is submitted, measured in one run.

    python benchmarks/cli.py [--files 1000000] [--repeats 5]

1. `adqueue jobs` wall time, median of `--repeats` runs (a fresh process each time, as a person
   at a terminal runs it), and the same for `adqueue --help`.
2. Submitting a dump of `--files` empty files (a temp dir) with a broker: `adqueue score` as a
   real process against its own redis-server and SQLite, no workers. Files/s is taken from SQL
   (the job's created_at to submitted_at: enumeration, shard rows, messages), and the process's
   peak RSS from the kernel (ru_maxrss of the finished child). With `--files` 0 it is skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.servers import redis_server

REPO = Path(__file__).resolve().parents[1]


def adqueue(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "adqueue", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, check=True)


def wall(args: list[str], env: dict[str, str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        adqueue(args, env)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def make_dump(folder: Path, count: int, per_folder: int = 10_000) -> None:
    for index in range(count):
        sub = folder / f"line{index // per_folder:03d}"
        if index % per_folder == 0:
            sub.mkdir(parents=True)
        (sub / f"img_{index:07d}.png").touch()


def submit(env: dict[str, str], dump: Path) -> tuple[int, float, float]:
    """(job id, files/s from SQL, peak RSS in MiB of the submitting process)."""
    from adqueue.core.config import Settings
    from adqueue.jobs.context import Context
    from adqueue.store.models import Job

    # Through a fresh Python whose only child is the CLI, so ru_maxrss covers that process alone.
    probe = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stdout.write(done.stdout); sys.stderr.write(done.stderr); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "adqueue", "score", "--model", "m",
                           str(dump), "--shard-size", "256"], env=env, cwd=REPO, capture_output=True, text=True,
                          check=True)
    peak = int(done.stderr.strip().splitlines()[-1])
    job_id = int(done.stdout.split()[0])
    ctx = Context(Settings.load(data_dir=env["ADQUEUE_DATA_DIR"], broker_url=""))
    with ctx.store.session() as session:
        job = session.get_one(Job, job_id)
        seconds = (job.submitted_at - job.created_at).total_seconds()
        files = job.n_total
    ctx.close()
    return job_id, files / seconds, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adqueue-cli-") as tmp, redis_server() as redis:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADQUEUE_")}
        env.update(ADQUEUE_DATA_DIR=str(root / "data"), ADQUEUE_BROKER_URL=redis, ADQUEUE_QUEUE="bench")
        embedded = {**env, "ADQUEUE_BROKER_URL": ""}
        from adqueue.cli.demo import build_dataset

        textures, _ = build_dataset(root / "textures", n_normal=24, n_dump=4)
        adqueue(["train", "--data", str(textures), "--name", "m", "--backbone", "efficientnet_lite0",
                 "--set", "image_size=128"], embedded)
        print(f"adqueue jobs   : {wall(['jobs'], env, args.repeats):.2f} s (median of {args.repeats})")
        print(f"adqueue --help : {wall(['--help'], env, args.repeats):.2f} s (median of {args.repeats})")
        if args.files:
            started = time.perf_counter()
            make_dump(root / "dump", args.files)
            print(f"(made {args.files:,} empty files in {time.perf_counter() - started:.0f} s)")
            job_id, rate, rss = submit(env, root / "dump")
            print(f"submit {args.files:,} files with a broker: {rate:,.0f} files/s, peak RSS {rss:.0f} MiB "
                  f"(job {job_id})")


if __name__ == "__main__":
    main()
