"""Micro-benchmarks of the scoring pipeline's design choices, each a ratio measured in one run.

    python benchmarks/pipeline.py [--images 600] [--rows 20000] [--postgres]

1. decoding: images decoded in background threads while the model runs, vs decoded inline.
2. SQL writes: one bulk upsert per shard vs one INSERT round trip per image (SQLite; PostgreSQL
   too with --postgres, on a throwaway server).
3. memory: peak RSS of `adqueue score` on dumps of growing size (constant memory claim).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adqueue.core.clock import utcnow
from adqueue.data.loader import batched, load_one, load_stream, stack_pixels, to_float
from adqueue.data.sources import Item
from adqueue.detectors import registry
from adqueue.pipeline.images import TensorImages
from adqueue.store.migrate import ensure_schema
from adqueue.store.models import Job, Result
from adqueue.store.results import upsert_results
from adqueue.store.session import Store

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, count: int, size: int = 512) -> list[Item]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size), dtype=np.uint8)
    items = []
    for index in range(count):
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(np.roll(base, index, axis=1)).save(path, quality=90)
        items.append(Item(str(path)))
    return items


def bench_decoding(items: list[Item]) -> list[tuple[str, float]]:
    detector = registry.create("mvg", {"backbone": "efficientnet_lite0", "image_size": "224"})
    prep = detector.preprocess
    detector.fit(TensorImages(stack_pixels(list(load_stream(items[:40], prep)))))
    detector.score(torch.zeros(3, 3, 224, 224))  # warm up kernels

    def run(stream) -> float:
        started = time.perf_counter()
        for batch in batched(stream, 32):
            detector.score(to_float(stack_pixels(batch)), with_maps=False)
        return len(items) / (time.perf_counter() - started)

    inline = run(load_one(item, prep) for item in items)
    threaded = run(load_stream(items, prep))
    return [("decode inline, then score", inline), ("decode in threads while scoring", threaded)]


def bench_sql(url: str, rows: int, shard: int = 256) -> list[tuple[str, float]]:
    store = Store(url)
    ensure_schema(store)
    with store.session() as session:
        job = Job(kind="score", status="running", source="bench", params={})
        session.add(job)
        session.flush()
        job_id = job.id

    def row(i: int, tag: str) -> dict:
        return {"job_id": job_id, "path": f"/{tag}/{i:08d}.png", "score": float(i), "is_anomaly": False,
                "sha256": "0" * 64, "width": 512, "height": 512, "scored_at": utcnow()}

    started = time.perf_counter()
    for start in range(0, rows, shard):
        with store.session() as session:
            upsert_results(session, [row(i, "bulk") for i in range(start, min(start + shard, rows))])
    bulk = rows / (time.perf_counter() - started)
    per_row_count = min(rows, 2000)
    started = time.perf_counter()
    for i in range(per_row_count):  # what a naive worker does: one statement and commit per image
        with store.session() as session:
            session.add(Result(**row(i, "single")))
    single = per_row_count / (time.perf_counter() - started)
    store.engine.dispose()
    return [(f"{store.dialect}: one INSERT + commit per image", single),
            (f"{store.dialect}: one bulk upsert per {shard}-image shard", bulk)]


def bench_memory(root: Path, sizes: list[int]) -> list[tuple[int, float, float]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADQUEUE_")}
    env.update(ADQUEUE_DATA_DIR=str(root / "mem"), ADQUEUE_BROKER_URL="")
    images = root / "mem-images"
    make_images(images / "good", 8, size=64)
    subprocess.run([sys.executable, "-m", "adqueue", "train", "--data", str(images / "good"), "--name", "mem",
                    "--backbone", "efficientnet_lite0", "--set", "image_size=64"], env=env, check=True,
                   capture_output=True)
    out = []
    for size in sizes:
        dump = root / f"dump{size}"
        make_images(dump, size, size=64)
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "adqueue", "score", "--model", "mem", str(dump),
                                  "--heatmaps", "none"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak_kib = 0
        while child.poll() is None:
            # VmHWM is the child's own high-water mark; getrusage would also count the forked
            # copy of this (torch-laden) parent from before exec.
            peak_kib = max(peak_kib, _vm_hwm_kib(child.pid))
            time.sleep(0.2)
        if child.returncode:
            raise SystemExit(f"adqueue score exited {child.returncode}")
        out.append((size, peak_kib / 1024, time.perf_counter() - started))
    return out


def _vm_hwm_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--memory-sizes", default="1000,10000")
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adqueue-pipe-") as tmp:
        root = Path(tmp)
        print(f"## decoding ({args.images} JPEGs of 512x512, mvg/efficientnet_lite0 at 224 px)\n")
        results = bench_decoding(make_images(root / "decode", args.images))
        print("| variant | images/s |\n|---|---|")
        for label, rate in results:
            print(f"| {label} | {rate:.1f} |")
        print(f"\nratio: {results[1][1] / results[0][1]:.2f}x\n")
        print(f"## result writes ({args.rows} rows)\n\n| variant | rows/s |\n|---|---|")
        urls = [f"sqlite:///{root / 'sql.db'}"]
        server = None
        if args.postgres:
            from harness.servers import create_database, postgres_server

            server = postgres_server()
            urls.append(create_database(server.__enter__(), "bench"))
        try:
            for url in urls:
                rates = bench_sql(url, args.rows)
                for label, rate in rates:
                    print(f"| {label} | {rate:.0f} |")
                print(f"| ratio | {rates[1][1] / rates[0][1]:.0f}x |")
        finally:
            if server is not None:
                server.__exit__(None, None, None)
        sizes = [int(n) for n in args.memory_sizes.split(",")]
        print("\n## memory of `adqueue score` (embedded, 64 px images)\n\n| images | peak RSS MiB | seconds |\n|---|---|---|")
        for size, rss, seconds in bench_memory(root, sizes):
            print(f"| {size} | {rss:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
