"""Fault benchmark: every failure scenario against real processes, on SQLite and PostgreSQL.

    python benchmarks/chaos.py [--databases sqlite,postgres] [--scenarios kill_one,...] [--json FILE]

Each scenario (tests/chaos.py) submits a job to a deployment of its own redis-server, database and
`adqueue worker` processes, does one fault for real (SIGKILL, a server restart, a crash at an
exact point, SIGTERM, cancel) and waits, touching nothing, until the job ends. The table gives the
job's final status, files in the dump, result rows and distinct paths (all three must be equal),
shards whose results were written by more than one run (must be 0), and the seconds from the fault
to the job's end against the bound: two lease periods plus the reconciler interval, counted from
the fault or from when a worker was there again to heal it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from harness.chaos import (
    BOUND_S,
    INTERVAL_S,
    LEASE_S,
    NEEDS_TEXTURES_ROOT,
    POSTGRES_ONLY,
    SCENARIOS,
    VISIBILITY_S,
    ChaosDeployment,
    Outcome,
)
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
            outcome = SCENARIOS[name](deployment, root if name in NEEDS_TEXTURES_ROOT else dump)
            print(f"{database:8} {name:18} {'ok ' if outcome.ok else 'BAD'} {outcome.seconds:5.1f} s  {outcome.note}",
                  file=sys.stderr, flush=True)
            outcomes.append(outcome)
    finally:
        deployment.close()
        if postgres:
            postgres.close()
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| scenario | database | final status | files | result rows | distinct paths | shards written twice "
        "| fault → end | bound | summary = rows | |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        bound = "no fault" if o.bound_s is None else f"{o.bound_s:.1f} s"
        lines.append(f"| {o.scenario} | {o.database} | {o.status} | {o.files} | {o.rows} | {o.distinct_paths} | "
                     f"{o.double_completions} | {o.seconds:.1f} s | {bound} | {'yes' if o.summary_matches else 'NO'} "
                     f"| {o.note} |")
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
    with tempfile.TemporaryDirectory(prefix="adqueue-chaos-") as tmp:
        root, dump = build_dataset(Path(tmp) / "data", n_normal=24, n_dump=16)
        for database in [d for d in args.databases.split(",") if d]:
            outcomes += run(database, scenarios, Path(tmp), root, dump)
    print(f"lease {LEASE_S:g} s, reconciler every {INTERVAL_S:g} s, visibility timeout {VISIBILITY_S} s: "
          f"bound {BOUND_S:g} s after the fault (or after workers are back)\n")
    print(table(outcomes))
    if args.json:
        args.json.write_text(json.dumps([o.as_dict() for o in outcomes], indent=2))
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


if __name__ == "__main__":
    main()
