"""Acceptance on real data: MTD through Redis and two workers with default mvg settings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks.harness.cli import run_json
from tests.helpers.datasets import datasets_or_skip
from tests.helpers.deployment import make_deployment

pytestmark = [pytest.mark.integration, pytest.mark.datasets]


def test_mtd_train_score_evaluate_through_two_workers(tmp_path: Path, redis_url: str) -> None:
    manifest = datasets_or_skip("mtd") / "manifest.csv"
    deployment = make_deployment("sqlite", tmp_path, redis_url, f"sqlite:///{tmp_path / 'mtd.db'}")
    try:
        deployment.start_workers(2)
        started = time.monotonic()
        trained = run_json(["train", "--data", str(manifest), "--name", "mtd", "--wait"], deployment.env)
        assert trained["status"] == "done" and trained["model"] == "mtd:1"
        scored = run_json(["score", "--model", "mtd", str(manifest), "--split", "test", "--shard-size", "64",
                           "--heatmaps", "none", "--wait"], deployment.env)
        rows = run_json(["results", str(scored["job_id"])], deployment.env)
        assert scored["status"] == "done" and len(rows) == 582 and len({r["path"] for r in rows}) == 582
        assert all(r["score"] is not None and r["error"] is None for r in rows)
        evaluated = run_json(["evaluate", "--model", "mtd", "--data", str(manifest), "--shard-size", "64", "--wait"],
                             deployment.env)
        print(f"\nMTD mvg defaults via Redis + 2 workers: image AUROC {evaluated['image_auroc']:.4f}, "
              f"pixel AUROC {evaluated['pixel_auroc']:.4f}, PRO {evaluated['pro']:.4f}, "
              f"{time.monotonic() - started:.0f} s for train + score + evaluate")
        assert evaluated["n_images"] == 582
        assert evaluated["image_auroc"] >= 0.95
        # the queue and in-process paths score identically, so the evaluate scores match the score job's
        eval_rows = {r["path"]: r["score"] for r in run_json(["results", str(evaluated["job_id"])], deployment.env)}
        assert all(eval_rows[r["path"]] == pytest.approx(r["score"], rel=1e-5) for r in rows)
    finally:
        deployment.stop()
