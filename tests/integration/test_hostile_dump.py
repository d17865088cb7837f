"""A camera share at its worst, scored through Redis by two workers on SQLite and PostgreSQL: the
job ends `done` with one truthful row per file (odd names stored as reversible text, heat maps
written for them too), a clear error for every bad file, and a score for every good one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from adqueue.data.paths import to_os
from adqueue.store.models import Result
from adqueue.store.session import Store
from benchmarks.harness.cli import FAST_MVG, run_cli, run_json
from tests.helpers.deployment import Deployment, database_for, make_deployment
from tests.helpers.hostile import ODD_NAMES, build_hostile_dump

pytestmark = pytest.mark.integration
MAX_FILE_MB = 2


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def scored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str,
           textures) -> Iterator[tuple[Deployment, dict, dict[bytes, str | None], dict[bytes, dict]]]:
    folder = tmp_path_factory.mktemp(f"hostile-{request.param}")
    deployment = make_deployment(request.param, folder, redis_url, database_for(request, request.param, folder),
                                 ADQUEUE_MAX_FILE_MB=str(MAX_FILE_MB))
    root, dump = textures
    good = next(p for p in sorted(dump.glob("*.png")) if "corrupt" not in p.name)
    expected = {e.name: e.error for e in build_hostile_dump(folder / "dump", good, max_file_mb=MAX_FILE_MB)}
    try:
        deployment.start_workers(2)
        run_json(["train", "--data", str(root), "--name", "m", *FAST_MVG, "--wait"], deployment.env)
        job = run_json(["score", "--model", "m", str(folder / "dump"), "--shard-size", "8", "--heatmaps", "all",
                        "--wait"], deployment.env)
        rows = run_json(["results", str(job["job_id"])], deployment.env)
        by_name = {os.path.relpath(os.fsencode(to_os(r["path"])), os.fsencode(folder / "dump")): r for r in rows}
        yield deployment, job, expected, by_name
    finally:
        deployment.stop()


def test_the_job_ends_done_with_one_row_per_file(scored) -> None:
    _, job, expected, rows = scored
    assert job["status"] == "done" and job["n_total"] == len(expected)
    assert set(rows) == set(expected)  # every file, special ones too; the folder x.png has none
    assert job["n_failed"] == sum(error is not None for error in expected.values())
    for name, error in expected.items():
        row = rows[name]
        if error is None:
            assert row["error"] is None and row["score"] is not None, (name, row["error"])
            assert Path(row["heatmap_path"]).is_file()
        else:
            assert row["score"] is None and error in (row["error"] or ""), (name, error, row["error"])


@pytest.mark.parametrize("what", list(ODD_NAMES))
def test_an_odd_name_is_scored_and_maps_back_to_its_file(scored, what: str) -> None:
    deployment, job, _, rows = scored
    row = rows[ODD_NAMES[what]]
    assert row["error"] is None and row["score"] is not None
    assert os.path.exists(to_os(row["path"])) and Path(row["heatmap_path"]).is_file()
    store = Store(deployment.env["ADQUEUE_DATABASE_URL"])
    with store.session() as session:  # the stored text is plain, queryable SQL text
        assert session.scalar(select(func.count()).select_from(Result).where(
            Result.job_id == job["job_id"], Result.path == row["path"])) == 1
    store.dispose()


def test_the_table_shows_every_name_on_one_line(scored) -> None:
    deployment, job, expected, _ = scored
    out = run_cli(["results", str(job["job_id"]), "--format", "csv"], deployment.env).stdout
    assert len(out.strip().splitlines()) == len(expected) + 1  # a newline in a name stays escaped
