"""differnet, ebm, encoder_flow and patchcore through Redis and two real worker processes, exactly like mvg.

Tiny settings keep each training to seconds; the detectors' quality has its own tests. This checks
that training runs on a worker, that every score a detector offers reaches SQL, and that the queue
and the embedded default agree.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.harness.cli import run_json
from tests.helpers.deployment import Deployment, make_deployment

pytestmark = pytest.mark.integration

TINY = {
    "differnet": ["--backbone", "efficientnet_lite0", "--set", "image_size=64", "--set", "n_scales=1", "--set", "hidden=64",
                  "--set", "n_blocks=2", "--set", "epochs=2", "--set", "train_transforms=2",
                  "--set", "test_transforms=2", "--set", "map_transforms=1"],
    "ebm": ["--set", "image_size=32", "--set", "width=8", "--set", "iterations=8", "--set", "batch_size=8",
            "--set", "negatives=4", "--set", "sgld_steps=5"],
    "encoder_flow": ["--set", "image_size=32", "--set", "ae_epochs=2", "--set", "flow_epochs=2",
                     "--set", "flow_blocks=2", "--set", "flow_hidden=32"],
    "patchcore": ["--backbone", "efficientnet_lite0", "--set", "image_size=64", "--set", "level_dim=16"],
}
EXTRA_SCORES = {
    "differnet": {"nll", "z2"},
    "ebm": {"energy", "a_raw_l1", "a_raw_l2", "a_std_l1", "a_std_l2"},
    "encoder_flow": {"reconstruction_l1"},
    "patchcore": set(),
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("deploy-detectors")
    deployment = make_deployment("sqlite", folder, redis_url, f"sqlite:///{folder / 'adqueue.db'}")
    deployment.start_workers(2)
    yield deployment
    deployment.stop()


@pytest.mark.parametrize("detector", sorted(TINY))
def test_detector_trains_scores_and_evaluates_on_workers(deployment: Deployment, textures, detector: str) -> None:
    root, dump = textures
    name = f"{detector}-{uuid.uuid4().hex[:6]}"
    trained = run_json(["train", "--detector", detector, "--data", str(root), "--name", name, *TINY[detector],
                        "--wait"], deployment.env)
    assert trained["status"] == "done" and trained["model"] == f"{name}:1"
    scored = run_json(["score", "--model", name, str(dump), "--shard-size", "4", "--heatmaps", "all", "--wait"],
                      deployment.env)
    assert scored["status"] == "done" and scored["n_failed"] == 2  # the corrupt PNG and the text file
    rows = run_json(["results", str(scored["job_id"])], deployment.env)
    assert len(rows) == len(list(dump.iterdir()))
    ok = [r for r in rows if r["error"] is None]
    assert ok and all(Path(r["heatmap_path"]).is_file() for r in ok)
    stored = run_json(["sql", f"SELECT scores FROM results WHERE job_id = {scored['job_id']} AND error IS NULL"],
                      deployment.env)
    assert len(stored) == len(ok)
    if EXTRA_SCORES[detector]:
        assert all(set(_json(r["scores"])) == EXTRA_SCORES[detector] for r in stored)
    workers = run_json(["sql", f"SELECT DISTINCT worker FROM shards WHERE job_id = {scored['job_id']}"],
                       deployment.env)
    assert len(workers) == 2  # both worker processes took shards

    inline = run_json(["score", "--model", f"{name}:1", str(dump), "--heatmaps", "none"], deployment.embedded_env())
    inline_rows = {r["path"]: r["score"] for r in run_json(["results", str(inline["job_id"])], deployment.env)}
    for row in ok:
        assert inline_rows[row["path"]] == pytest.approx(row["score"], rel=1e-4, abs=1e-5)

    evaluated = run_json(["evaluate", "--model", name, "--data", str(root), "--shard-size", "5", "--wait"],
                         deployment.env)
    assert evaluated["status"] == "done" and 0.0 <= evaluated["image_auroc"] <= 1.0
    assert "pixel_auroc" in evaluated and "pro" in evaluated
    assert {f"image_auroc.{s}" for s in EXTRA_SCORES[detector]} <= set(evaluated)


def _json(value: object) -> dict:
    return value if isinstance(value, dict) else json.loads(str(value))
