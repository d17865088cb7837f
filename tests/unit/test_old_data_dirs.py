"""A data dir written by an older adqueue keeps working: its database upgrades in place, its model
file loads, and the model scores the same images exactly as it did then (tests/fixtures/pre_layout)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from adqueue.store.migrate import head_revision
from tests.helpers.cli import invoke_cli

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pre_layout"


@pytest.fixture
def old_data_dir(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE / "data", data)
    shutil.copytree(FIXTURE / "dump", tmp_path / "dump")
    return data, tmp_path / "dump"


def _old_scores(database: Path, job_id: int) -> dict[str, tuple[float, bool]]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT path, score, is_anomaly FROM results WHERE job_id = ?", (job_id,))
        return {Path(path).name: (score, bool(flag)) for path, score, flag in rows}


def test_an_old_data_dir_upgrades_loads_and_scores_identically(old_data_dir: tuple[Path, Path]) -> None:
    data, dump = old_data_dir
    before = _old_scores(data / "adqueue.db", job_id=2)
    assert len(before) == 6

    invoke_cli(data, "db", "upgrade")
    with sqlite3.connect(data / "adqueue.db") as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]

    (model,) = json.loads(invoke_cli(data, "models", "--format", "json").stdout)
    assert model["model"] == "fixture:1" and model["detector"] == "mvg"
    old_job = json.loads(invoke_cli(data, "jobs", "2", "--format", "json").stdout)
    assert old_job["status"] == "done" and old_job["n_done"] == 6

    scored = json.loads(invoke_cli(data, "score", "--model", "fixture", str(dump), "--heatmaps", "none",
                                   "--format", "json").stdout)
    assert scored["status"] == "done" and scored["n_done"] == 6
    after = {Path(row["path"]).name: (row["score"], row["is_anomaly"])
             for row in json.loads(invoke_cli(data, "results", str(scored["job_id"]), "--format", "json").stdout)}
    assert after.keys() == before.keys()
    for name, (score, flagged) in before.items():
        assert after[name][0] == pytest.approx(score, rel=1e-5, abs=1e-6), name
        assert after[name][1] is flagged, name
