"""Fault benchmark: every failure scenario against real processes, on SQLite and PostgreSQL.

    python benchmarks/chaos.py [--databases sqlite,postgres] [--scenarios kill_one,...] [--json FILE]

Each scenario (harness/chaos.py, harness/chaos_faults.py) submits a job to a deployment of its own
redis-server, database and `adqueue worker` processes, does one fault for real (SIGKILL, a server
restart, a crash at an exact point, SIGTERM, SIGQUIT, cancel, a full tmpfs under the heat maps,
malformed queue entries, PostgreSQL dead under `score --wait`, Redis killed mid-submission) and
waits, touching nothing, until the job ends. ADQUEUE_CHAOS_PG_OUTAGE sets how long PostgreSQL
stays dead under `--wait` (default 60 s). The table gives the
job's final status, files in the dump, result rows and distinct paths (all three must be equal),
shards whose results were written by more than one run (must be 0), whether jobs.started_at was
set, and the seconds from the fault
to the job's end against the bound: two lease periods plus the reconciler interval, counted from
the fault or from when a worker was there again to heal it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from harness.chaos import BOUND_S, INTERVAL_S, LEASE_S, VISIBILITY_S, ChaosDeployment, Outcome
from harness.chaos_faults import ALL_NEEDS_TEXTURES_ROOT as NEEDS_TEXTURES_ROOT
from harness.chaos_faults import ALL_POSTGRES_ONLY as POSTGRES_ONLY
from harness.chaos_faults import ALL_SCENARIOS as SCENARIOS
from harness.chaos_faults import NEEDS_ROOT, PG_OUTAGE_S
from harness.servers import PostgresServer

from adqueue.cli.demo import build_dataset

REPO = Path(__file__).resolve().parents[1]


def run(database: str, scenarios: list[str], folder: Path, root: Path, dump: Path) -> list[Outcome]:
    postgres = PostgresServer() if database == "postgres" else None
    deployment = ChaosDeployment(folder / database, postgres=postgres)
    outcomes = []
    try:
        deployment.train(root)
        deployment.start_workers(2)
        for name in scenarios:
            if name in POSTGRES_ONLY and postgres is None:
                continue
            if name in NEEDS_ROOT and os.geteuid() != 0:
                print(f"{database:8} {name:18} skipped: mounting a tmpfs needs root", file=sys.stderr, flush=True)
                continue
            started = time.monotonic()
            try:
                outcome = SCENARIOS[name](deployment, root if name in NEEDS_TEXTURES_ROOT else dump)
            except Exception as exc:  # noqa: BLE001 - one scenario that cannot run is a row, not the end of the table
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                outcome = Outcome(name, database, f"not run: {reason}", 0, 0, 0, 0, time.monotonic() - started, None)
            print(f"{database:8} {name:18} {'ok ' if outcome.ok else 'BAD'} {outcome.seconds:5.1f} s  {outcome.note} "
                  f"[scenario took {time.monotonic() - started:.0f} s]", file=sys.stderr, flush=True)
            outcomes.append(outcome)
    finally:
        deployment.close()
        if postgres:
            postgres.close()
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| scenario | database | final status | files | result rows | distinct paths | shards written twice "
        "| started_at set | fault → end | bound | summary = rows | |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        bound = "no fault" if o.bound_s is None else f"{o.bound_s:.1f} s"
        lines.append(f"| {o.scenario} | {o.database} | {o.status} | {o.files} | {o.rows} | {o.distinct_paths} | "
                     f"{o.double_completions} | {'yes' if o.started else 'NO'} | {o.seconds:.1f} s | {bound} | "
                     f"{'yes' if o.summary_matches else 'NO'} | "
                     f"{o.note}{f'; {o.heatmap_faults} heat map(s) missing or not their run' if o.heatmap_faults else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"from: {', '.join(SCENARIOS)}")
    parser.add_argument("--json", type=Path, help="also write the outcomes to this file")
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    outcomes: list[Outcome] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="adqueue-chaos-") as tmp:
        root, dump = build_dataset(Path(tmp) / "data", n_normal=24, n_dump=16)
        for database in [d for d in args.databases.split(",") if d]:
            outcomes += run(database, scenarios, Path(tmp), root, dump)
    print(f"lease {LEASE_S:g} s, reconciler every {INTERVAL_S:g} s, visibility timeout {VISIBILITY_S} s: "
          f"bound {BOUND_S:g} s after the fault (or after workers are back); PostgreSQL outage under --wait "
          f"{PG_OUTAGE_S:g} s; whole run {time.monotonic() - began:.0f} s\n")
    print(table(outcomes))
    if args.json:
        args.json.write_text(json.dumps([o.as_dict() for o in outcomes], indent=2))
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


if __name__ == "__main__":
    main()
