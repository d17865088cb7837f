"""Scoring throughput: in-process vs Redis with 1 and N workers, measured in one run.

    python benchmarks/throughput.py [--images 600] [--workers 1,2] [--settings fast|default]

Starts its own redis-server on a free port, trains one model, then scores the same dump once per
mode and prints images/s and the speed-up over one worker. Each worker gets cores/N torch threads,
so on a machine with C cores the ideal speed-up of N <= C workers is close to N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.servers import Worker, redis_server

from adqueue.cli.demo import build_dataset

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {
    "fast": ["--backbone", "efficientnet_lite0", "--set", "image_size=128"],
    "default": [],
}


def adqueue(args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "adqueue", *args, "--format", "json"], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"adqueue {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def timed_score(env: dict[str, str], dump: Path, shard_size: int, wait: bool) -> float:
    started = time.perf_counter()
    job = adqueue(["score", "--model", "bench", str(dump), "--shard-size", str(shard_size), "--heatmaps", "none",
                   *(["--wait"] if wait else [])], env)
    elapsed = time.perf_counter() - started
    assert job["status"] == "done", job
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="fast")
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="adqueue-bench-") as tmp, redis_server() as redis:
        root = Path(tmp)
        mvtec, dump = build_dataset(root / "images", n_normal=40, n_dump=args.images)
        for junk in ("line3_corrupt.png", "operator_notes.txt"):
            (dump / junk).unlink()
        base = {k: v for k, v in os.environ.items() if not k.startswith("ADQUEUE_")}
        base.update(ADQUEUE_DATA_DIR=str(root / "data"), ADQUEUE_DATABASE_URL=f"sqlite:///{root / 'bench.db'}",
                    PYTHONUNBUFFERED="1")
        embedded = {**base, "ADQUEUE_BROKER_URL": ""}
        adqueue(["train", "--data", str(mvtec), "--name", "bench", *SETTINGS[args.settings]], embedded)
        rows = [("in-process (embedded)", 1, timed_score(embedded, dump, args.shard_size, wait=False))]
        for count in counts:
            env = {**base, "ADQUEUE_BROKER_URL": redis, "ADQUEUE_QUEUE": f"bench{count}",
                   "ADQUEUE_TORCH_THREADS": str(max(1, cores // count))}
            workers = [Worker(env, root / f"w{count}-{i}.log") for i in range(count)]
            try:
                for worker in workers:
                    worker.wait_ready()
                timed_score(env, dump, args.shard_size, wait=True)  # warm-up: models load once per worker
                rows.append((f"Redis + {count} worker(s)", count, timed_score(env, dump, args.shard_size, wait=True)))
            finally:
                for worker in workers:
                    worker.stop()
    single = next((s for label, n, s in rows if n == 1 and "Redis" in label), rows[0][2])
    print(f"\n{args.images} images, settings={args.settings}, shard size {args.shard_size}, {cores} cores\n")
    print("| mode | workers | seconds | images/s | speed-up vs 1 worker |")
    print("|---|---|---|---|---|")
    for label, count, seconds in rows:
        print(f"| {label} | {count} | {seconds:.1f} | {args.images / seconds:.1f} | {single / seconds:.2f}x |")


if __name__ == "__main__":
    main()
