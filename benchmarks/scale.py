"""A month of million-image nights: every page and read verb, timed at one size and at another.

    python benchmarks/scale.py [--backend sqlite|postgres] [--nights 10] [--rows 10000,1000000]
                               [--json FILE]

For each size in --rows (rows a night), a fresh database (a SQLite file, or a throwaway PostgreSQL
from benchmarks/harness/servers.py) gets --nights done score jobs of one model on one source, their
shards (done, 256 files each) and their result rows, loaded straight into the tables by SQL that
generates them in the database (INSERT ... SELECT over generate_series, or a recursive CTE on
SQLite): 1% flagged, 0.1% error rows, 8 camera sub-folders, a row as wide as a scored image's.
No summary exists then, as after an upgrade from an older version or a bulk load.

Then, timed:
- the first reconciler pass (`adqueue reconcile`): it builds every job's summary from its rows;
- each page of a real `adqueue serve` (the median of 3 requests, and the slowest): the jobs list,
  the last night's job page, its 20th page of flagged images (reached by following the pages'
  own "next" links), the model page, the trend;
- each read verb as a user runs it (a fresh process, interpreter start included): `adqueue jobs`,
  `jobs N`, `results N --top 20`, `models`.

It prints a table with a column per size and the ratio of the last to the first. The acceptance:
every page and verb within 1.5 s at 1,000,000 rows a night, and within 2x its time at 10,000.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness.cli import cli_env, run_cli
from harness.servers import REPO, PostgresServer, create_database, free_port, wait_until
from sqlalchemy import text

from adqueue.core.clock import utcnow
from adqueue.store.migrate import ensure_schema
from adqueue.store.models import Job, JobKind, JobStatus, Model
from adqueue.store.session import Store

SHARD = 256
SOURCE = "/plant/line1/nightly"
MODEL = "tiles"
THRESHOLD = 1.0

# One night's rows, generated in the database from :first (the night's first shard id). Normal
# scores are a mean of four uniforms (below the threshold); every 100th row is flagged (above),
# every 1000th (offset 7) an error row.
_ROWS_PG = f"""
INSERT INTO results (job_id, model_id, shard_id, path, sha256, score, is_anomaly, heatmap_path, error, width,
                     height, scored_at, file_size, file_mtime_ns)
SELECT :job, :model, :first + (i - 1) / {SHARD}, '{SOURCE}/cam' || (i % 8) || '/' || lpad(i::text, 9, '0') || '.png',
       CASE WHEN i % 1000 = 7 THEN NULL ELSE md5(i::text) || md5((i + 1)::text) END,
       CASE WHEN i % 1000 = 7 THEN NULL WHEN i % 100 = 0 THEN 1.0 + random() * 3
            ELSE (random() + random() + random() + random()) / 4.0 END,
       CASE WHEN i % 1000 = 7 THEN NULL ELSE i % 100 = 0 END,
       CASE WHEN i % 100 = 0 THEN 'heatmaps/' || :job || '/' || i || '.png' END,
       CASE WHEN i % 1000 = 7 THEN 'not an image: cannot identify image file' END,
       CASE WHEN i % 1000 = 7 THEN NULL ELSE 1024 END, CASE WHEN i % 1000 = 7 THEN NULL ELSE 1024 END,
       :at, 250000 + i % 9973, 1764000000000000000 + i
FROM generate_series(1, :rows) AS i
"""
_ROWS_SQLITE = f"""
WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < :rows)
INSERT INTO results (job_id, model_id, shard_id, path, sha256, score, is_anomaly, heatmap_path, error, width,
                     height, scored_at, file_size, file_mtime_ns)
SELECT :job, :model, :first + (i - 1) / {SHARD}, '{SOURCE}/cam' || (i % 8) || '/' || printf('%09d', i) || '.png',
       CASE WHEN i % 1000 = 7 THEN NULL ELSE lower(hex(randomblob(32))) END,
       CASE WHEN i % 1000 = 7 THEN NULL WHEN i % 100 = 0 THEN 1.0 + (abs(random()) % 1000000) / 333333.0
            ELSE ((abs(random()) % 1000000) + (abs(random()) % 1000000) + (abs(random()) % 1000000)
                  + (abs(random()) % 1000000)) / 4000000.0 END,
       CASE WHEN i % 1000 = 7 THEN NULL ELSE i % 100 = 0 END,
       CASE WHEN i % 100 = 0 THEN 'heatmaps/' || :job || '/' || i || '.png' END,
       CASE WHEN i % 1000 = 7 THEN 'not an image: cannot identify image file' END,
       CASE WHEN i % 1000 = 7 THEN NULL ELSE 1024 END, CASE WHEN i % 1000 = 7 THEN NULL ELSE 1024 END,
       :at, 250000 + i % 9973, 1764000000000000000 + i
FROM seq
"""


def load(url: str, nights: int, rows: int) -> tuple[int, float]:
    """The nights, loaded straight into the tables; returns the last job's id and the seconds taken."""
    started = time.monotonic()
    store = Store(url)
    ensure_schema(store)
    calibration = [0.35 + 0.3 * (i % 97) / 97 for i in range(200)]
    with store.session() as session:
        model = Model(name=MODEL, version=1, detector="mvg", backbone="efficientnet_lite0", artifact_path="m",
                      threshold=THRESHOLD, params={"calibration": {"scores": calibration}})
        session.add(model)
        session.flush()
        model_id = model.id
    n_shards = -(-rows // SHARD)
    job_id = 0
    for night in range(nights):
        at = utcnow()
        with store.session() as session:
            job = Job(kind=JobKind.SCORE, status=JobStatus.DONE, model_id=model_id, source=SOURCE, params={},
                      queue="gpu", n_total=rows, n_done=rows - rows // 1000, n_failed=rows // 1000, created_at=at,
                      started_at=at, finished_at=at, submitted_at=at)
            session.add(job)
            session.flush()
            job_id = job.id
            # Shards as a finished night leaves them; their item lists are not what is measured here.
            first = session.scalar(text("SELECT COALESCE(MAX(id), 0) + 1 FROM shards"))
            session.execute(text(
                "INSERT INTO shards (id, job_id, seq, status, attempts, n_items, items, n_ok, n_failed, finished_at) "
                "VALUES (:id, :job, :seq, 'done', 1, :n, '[]', :n, 0, :at)"),
                [{"id": first + seq, "job": job_id, "seq": seq, "n": min(SHARD, rows - seq * SHARD), "at": at}
                 for seq in range(n_shards)])
            session.execute(text(_ROWS_PG if store.dialect == "postgresql" else _ROWS_SQLITE),
                            {"job": job_id, "model": model_id, "first": first, "rows": rows, "at": at})
        print(f"  night {night + 1}/{nights} loaded ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    if store.dialect == "postgresql":
        with store.engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    else:
        with store.engine.connect() as connection:
            connection.execute(text("ANALYZE"))
            connection.commit()
    store.engine.dispose()
    return job_id, time.monotonic() - started


def timed(action: Any, repeats: int = 3) -> tuple[float, float]:
    """(median, slowest) seconds of `repeats` runs of `action`."""
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        action()
        times.append(time.monotonic() - started)
    return statistics.median(times), max(times)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=600) as reply:
        assert reply.status == 200, (url, reply.status)
        return reply.read().decode()


def measure(url: str, data_dir: Path, nights: int, rows: int) -> dict[str, Any]:
    print(f"{rows:,} rows a night x {nights} nights:", file=sys.stderr, flush=True)
    last_job, load_s = load(url, nights, rows)
    env = cli_env(ADQUEUE_DATA_DIR=str(data_dir), ADQUEUE_DATABASE_URL=url, ADQUEUE_BROKER_URL="")
    figures: dict[str, Any] = {"load_s": round(load_s, 1)}
    started = time.monotonic()
    run_cli(["reconcile"], env, timeout=7200)
    figures["first reconciler pass"] = (round(time.monotonic() - started, 2), None)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "adqueue", "serve", "--port", str(port)], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get(base + "/models/" + MODEL), 60, "adqueue serve")
        job_page = f"{base}/jobs/{last_job}"
        page, html = job_page, get(job_page)
        for _ in range(19):  # to the 20th page of flagged images (or the last) by the pages' own links
            found = re.search(r'<a href="(\?[^"]*)" rel="next">', html)
            if not found:
                break
            page = job_page + found.group(1).replace("&amp;", "&")
            html = get(page)
        number = re.search(r"page (\d+) of \d+", html)
        figures["flagged page reached"] = (int(number.group(1)) if number else 1, None)
        pages = {
            "GET / (jobs list)": base + "/",
            f"GET /jobs/{last_job}": job_page,
            f"GET /jobs/{last_job}, flagged page 20 (or the last)": page,
            f"GET /models/{MODEL}": f"{base}/models/{MODEL}",
            "GET /trend": f"{base}/trend?model={MODEL}&source={urllib.request.quote(SOURCE, safe='')}",
        }
        for name, address in pages.items():
            figures[name] = tuple(round(v, 3) for v in timed(lambda address=address: get(address)))
    finally:
        server.terminate()
        server.wait(30)
    verbs = {"adqueue jobs": ["jobs"], f"adqueue jobs {last_job}": ["jobs", str(last_job)],
             f"adqueue results {last_job} --top 20": ["results", str(last_job), "--top", "20"],
             "adqueue models": ["models"]}
    for name, args in verbs.items():
        figures[name] = tuple(round(v, 3) for v in timed(lambda args=args: run_cli(args, env)))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--nights", type=int, default=10)
    parser.add_argument("--rows", default="10000,1000000", help="rows a night: one size or several, comma-separated")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    sizes = [int(r) for r in args.rows.split(",") if r]
    results: dict[int, dict[str, Any]] = {}
    server = PostgresServer() if args.backend == "postgres" else None
    try:
        with tempfile.TemporaryDirectory(prefix="adqueue-scale-") as tmp:
            for rows in sizes:
                data_dir = Path(tmp) / f"data-{rows}"
                data_dir.mkdir()
                url = (create_database(server.url, f"scale_{rows}") if server
                       else f"sqlite:///{data_dir / 'adqueue.db'}")
                results[rows] = measure(url, data_dir, args.nights, rows)
                if args.json:
                    args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    finally:
        if server:
            server.close()
    print(f"\n{args.backend}, {args.nights} nights; seconds, median of 3 (slowest)\n")
    header = " | ".join(f"{rows:,} rows/night" for rows in sizes)
    print(f"| | {header} |" + (" ratio |" if len(sizes) > 1 else ""))
    print("|---|" + "---|" * (len(sizes) + (len(sizes) > 1)))
    first, last = results[sizes[0]], results[sizes[-1]]  # fresh databases: the same job ids at every size
    for name in last:
        if name in ("load_s", "flagged page reached"):
            continue
        cells = []
        for rows in sizes:
            median, slowest = results[rows][name]
            cells.append(f"{median:.2f}" + (f" ({slowest:.2f})" if slowest is not None else ""))
        ratio = f" {last[name][0] / first[name][0]:.1f}x |" if len(sizes) > 1 and first[name][0] else ""
        print(f"| {name} | " + " | ".join(cells) + " |" + ratio)
    print("\nflagged page reached: " + ", ".join(f"{results[r]['flagged page reached'][0]} ({r:,} rows/night)"
                                                for r in sizes))
    print("loaded in " + ", ".join(f"{results[r]['load_s']:.0f} s ({r:,} rows/night)" for r in sizes))


if __name__ == "__main__":
    main()
