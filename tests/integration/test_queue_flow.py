"""Train, score and evaluate through Redis and two real worker processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.harness.cli import FAST_MVG, run_json
from tests.helpers.deployment import Deployment

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(deployment: Deployment, textures) -> dict:
    root, _ = textures
    return run_json(["train", "--data", str(root), "--name", "bricks", *FAST_MVG, "--wait"], deployment.env)


@pytest.fixture(scope="module")
def scored(deployment: Deployment, trained: dict, textures) -> dict:
    _, dump = textures
    return run_json(["score", "--model", "bricks", str(dump), "--shard-size", "3", "--wait"], deployment.env)


def test_training_runs_on_a_worker(deployment: Deployment, trained: dict) -> None:
    assert trained["status"] == "done" and trained["model"] == "bricks:1"
    logs = "".join(w.log.read_text() for w in deployment.workers)
    assert "adqueue.train" in logs and "computes on cpu" in logs
    # a worker's log keeps training's warnings, which a terminal prints from the model row instead
    assert re.search(r"WARNING adqueue.runners.train: train job \d+: the threshold is calibrated on only 5 ", logs)


def test_score_through_the_queue(deployment: Deployment, scored: dict, textures) -> None:
    _, dump = textures
    files = sorted(p.name for p in dump.iterdir())
    assert scored["status"] == "done" and scored["n_total"] == len(files) and scored["shards"] == 6
    rows = run_json(["results", str(scored["job_id"])], deployment.env)
    assert sorted(Path(r["path"]).name for r in rows) == files  # one row per image
    errors = {Path(r["path"]).name for r in rows if r["error"]}
    assert errors == {"line3_corrupt.png", "operator_notes.txt"}
    flagged = [r for r in rows if r["is_anomaly"]]
    assert flagged and all(Path(r["heatmap_path"]).is_file() for r in flagged)
    workers = run_json(["sql", f"SELECT DISTINCT worker FROM shards WHERE job_id = {scored['job_id']}"],
                       deployment.env)
    assert len(workers) == 2  # both worker processes took shards


def test_embedded_gives_the_same_scores_as_the_queue(deployment: Deployment, scored: dict, textures) -> None:
    _, dump = textures
    inline = run_json(["score", "--model", "bricks:1", str(dump)], deployment.embedded_env())
    assert inline["status"] == "done"
    queue_rows = {r["path"]: r for r in run_json(["results", str(scored["job_id"])], deployment.env)}
    inline_rows = {r["path"]: r for r in run_json(["results", str(inline["job_id"])], deployment.env)}
    assert set(queue_rows) == set(inline_rows)
    for path, row in queue_rows.items():
        other = inline_rows[path]
        if row["score"] is None:
            assert other["score"] is None and other["error"] == row["error"]
        else:
            assert other["score"] == pytest.approx(row["score"], rel=1e-5, abs=1e-5)
            assert other["is_anomaly"] == row["is_anomaly"]


def test_evaluate_through_the_queue(deployment: Deployment, trained: dict, textures) -> None:
    root, _ = textures
    out = run_json(["evaluate", "--model", "bricks", "--data", str(root), "--shard-size", "7", "--wait"],
                   deployment.env)
    assert out["status"] == "done" and out["n_done"] == 16
    assert out["image_auroc"] > 0.9 and out["pixel_auroc"] > 0.85 and "pro" in out
    stored = run_json(["sql", f"SELECT count(*) AS n FROM metrics WHERE job_id = {out['job_id']}"], deployment.env)
    assert stored[0]["n"] >= 8
