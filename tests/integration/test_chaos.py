"""Every fault scenario of benchmarks/chaos.py, on SQLite and on PostgreSQL: the job ends `done`
with exactly one row per file, no shard's rows written by two runs, `started_at` set, every row's
heat map there and its own run's, its summary equal to a rebuild from its rows (retries,
takeovers, cancel and resume included), within two lease periods plus the reconciler interval of
the fault (or of a worker being there to heal it). The scenarios of harness/chaos_faults.py check
their own fault too (a full tmpfs, poison entries, PostgreSQL dead under `score --wait` for
ADQUEUE_CHAOS_PG_OUTAGE seconds, default 60; Redis killed mid-submission; SIGQUIT)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from benchmarks.harness.chaos import ChaosDeployment
from benchmarks.harness.chaos_faults import ALL_NEEDS_TEXTURES_ROOT as NEEDS_TEXTURES_ROOT
from benchmarks.harness.chaos_faults import ALL_POSTGRES_ONLY as POSTGRES_ONLY
from benchmarks.harness.chaos_faults import ALL_SCENARIOS as SCENARIOS
from benchmarks.harness.chaos_faults import NEEDS_ROOT
from benchmarks.harness.servers import PostgresServer

pytestmark = pytest.mark.integration


def _deployment(tmp_path_factory: pytest.TempPathFactory, textures, postgres: PostgresServer | None,
                ) -> Iterator[ChaosDeployment]:
    deployment = ChaosDeployment(tmp_path_factory.mktemp("chaos"), postgres=postgres)
    try:
        deployment.train(textures[0])
        deployment.start_workers(2)
        yield deployment
    finally:
        deployment.close()
        if postgres:
            postgres.close()


@pytest.fixture(scope="module")
def chaos_sqlite(tmp_path_factory: pytest.TempPathFactory, textures) -> Iterator[ChaosDeployment]:
    yield from _deployment(tmp_path_factory, textures, None)


@pytest.fixture(scope="module")
def chaos_postgres(tmp_path_factory: pytest.TempPathFactory, textures) -> Iterator[ChaosDeployment]:
    yield from _deployment(tmp_path_factory, textures, PostgresServer())  # its own: a scenario restarts it


CASES = [(database, scenario) for database in ("sqlite", "postgres") for scenario in SCENARIOS
         if database == "postgres" or scenario not in POSTGRES_ONLY]


@pytest.mark.parametrize(("database", "scenario"), CASES, ids=[f"{d}-{s}" for d, s in CASES])
def test_the_job_ends_done_with_one_row_per_file(request: pytest.FixtureRequest, textures, database: str,
                                                 scenario: str) -> None:
    if scenario in NEEDS_ROOT and os.geteuid() != 0:
        pytest.skip("a full disk is a real tmpfs, and mounting one needs root (CI runs as root)")
    chaos: ChaosDeployment = request.getfixturevalue(f"chaos_{database}")
    root, dump = textures
    outcome = SCENARIOS[scenario](chaos, root if scenario in NEEDS_TEXTURES_ROOT else dump)
    print(f"\n{outcome.as_dict()}")
    assert outcome.status == "done", outcome  # each fault's own checks turn the status into what failed
    assert outcome.rows == outcome.distinct_paths == outcome.files, outcome
    assert outcome.double_completions == 0, outcome
    assert outcome.started, outcome
    assert outcome.heatmap_faults == 0, outcome
    assert outcome.in_time, outcome
    assert outcome.summary_matches, outcome  # the summary equals a rebuild from the rows
