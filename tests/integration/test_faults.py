"""Faults: a worker killed in the middle of a shard, and a shard that fails on every attempt."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from adqueue.config import Settings
from adqueue.service.context import Context
from adqueue.store.models import Job, Model, Shard
from tests.conftest import FAST_MVG, run_cli, run_json
from tests.integration.conftest import make_deployment
from tests.servers import wait_until

pytestmark = pytest.mark.integration


def _store_settings(env: dict[str, str]) -> Settings:
    return Settings.load(data_dir=env["ADQUEUE_DATA_DIR"], database_url=env["ADQUEUE_DATABASE_URL"], broker_url="")


def _big_dump(folder: Path, source_dump: Path, copies: int) -> Path:
    """Many distinct files from the texture dump's images (same pixels, different paths)."""
    images = sorted(p for p in source_dump.glob("*.png") if "corrupt" not in p.name)
    folder.mkdir()
    for index in range(copies):
        shutil.copy(images[index % len(images)], folder / f"img_{index:05d}.png")
    return folder


def test_a_worker_killed_mid_shard_loses_nothing(tmp_path: Path, redis_url: str, textures) -> None:  # type: ignore[no-untyped-def]
    root, dump = textures
    deployment = make_deployment(
        "sqlite", tmp_path, redis_url, f"sqlite:///{tmp_path / 'a.db'}",
        ADQUEUE_VISIBILITY_TIMEOUT="3",  # a crashed worker's message comes back after 3 s
        ADQUEUE_BATCH_SIZE="1",  # slow enough that the kill lands mid-shard
    )
    try:
        (first,) = deployment.start_workers(1)
        run_json(["train", "--data", str(root), "--name", "m", *FAST_MVG, "--wait"], deployment.env)
        big = _big_dump(tmp_path / "dump", dump, 150)
        job = run_json(["score", "--model", "m", str(big), "--shard-size", "150", "--heatmaps", "all"], deployment.env)
        ctx = Context(_store_settings(deployment.env))

        def shard_running() -> bool:
            with ctx.store.session() as session:
                shard = session.query(Shard).filter_by(job_id=job["job_id"]).one()
                return shard.status == "running"

        wait_until(shard_running, 120, "the shard to start")
        time.sleep(1.0)
        first.kill()  # SIGKILL: no warm shutdown, the message stays unacknowledged in Redis
        with ctx.store.session() as session:
            assert session.query(Shard).filter_by(job_id=job["job_id"]).one().status == "running"
        deployment.start_workers(1)

        def job_ended() -> bool:
            with ctx.store.session() as session:
                return session.get_one(Job, job["job_id"], populate_existing=True).status in ("done", "failed")

        wait_until(job_ended, 180, "the job to finish on the second worker", interval=0.5)
        summary = run_json(["jobs", str(job["job_id"])], deployment.env)
        assert summary["status"] == "done" and summary["n_done"] == 150 and summary["n_failed"] == 0
        rows = run_json(["results", str(job["job_id"])], deployment.env)
        assert len(rows) == 150 and len({r["path"] for r in rows}) == 150
        with ctx.store.session() as session:
            shard = session.query(Shard).filter_by(job_id=job["job_id"]).one()
            assert shard.attempts == 2 and shard.status == "done"
    finally:
        deployment.stop()


def test_a_poisoned_shard_stops_after_max_attempts(tmp_path: Path, redis_url: str, textures) -> None:  # type: ignore[no-untyped-def]
    root, dump = textures
    deployment = make_deployment(
        "sqlite", tmp_path, redis_url, f"sqlite:///{tmp_path / 'p.db'}",
        ADQUEUE_MAX_ATTEMPTS="2", ADQUEUE_RETRY_DELAY="0.5",
    )
    try:
        deployment.start_workers(1)
        run_json(["train", "--data", str(root), "--name", "gone", *FAST_MVG, "--wait"], deployment.env)
        ctx = Context(_store_settings(deployment.env))
        with ctx.store.session() as session:
            artifact = session.query(Model).filter_by(name="gone").one().artifact_path
        ctx.data_dir.resolve(artifact).unlink()  # every attempt to load the model now fails
        files = sorted(p.name for p in dump.iterdir())
        done = run_cli(["score", "--model", "gone", str(dump), "--shard-size", "100", "--wait", "--format", "json"],
                       deployment.env, check=False)
        assert done.returncode == 1  # --wait reports the failed job
        summary = json.loads(done.stdout)
        assert summary["status"] == "failed" and summary["shards_failed"] == 1
        assert summary["n_failed"] == len(files) and "shard(s) failed" in summary["error"]
        rows = run_json(["results", str(summary["job_id"])], deployment.env)
        assert sorted(Path(r["path"]).name for r in rows) == files  # every image has a row...
        assert all("model file missing" in r["error"] for r in rows)  # ...saying why
        with ctx.store.session() as session:
            assert session.query(Shard).filter_by(job_id=summary["job_id"]).one().attempts == 2
    finally:
        deployment.stop()
