"""Faults that must end a job the right way: a shard that fails on every attempt stops after
`max_attempts` with a row per image; a missing or truncated model fails the job at once."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from adqueue.core.config import Settings
from adqueue.jobs.context import Context
from adqueue.store.models import Model, Run, Shard
from benchmarks.harness.cli import FAST_MVG, run_cli, run_json
from tests.helpers.deployment import Deployment, make_deployment

pytestmark = pytest.mark.integration


def _store(env: dict[str, str]) -> Context:
    return Context(Settings.load(data_dir=env["ADQUEUE_DATA_DIR"], database_url=env["ADQUEUE_DATABASE_URL"],
                                 broker_url=""))


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, redis_url: str, textures) -> Deployment:
    folder = tmp_path_factory.mktemp("faults")
    deployment = make_deployment("sqlite", folder, redis_url, f"sqlite:///{folder / 'f.db'}",
                                 ADQUEUE_MAX_ATTEMPTS="2", ADQUEUE_RETRY_DELAY="0.5")
    deployment.start_workers(1)
    yield deployment
    deployment.stop()


def _train(deployment: Deployment, textures, name: str) -> Path:
    run_json(["train", "--data", str(textures[0]), "--name", name, *FAST_MVG, "--wait"], deployment.env)
    ctx = _store(deployment.env)
    with ctx.store.session() as session:
        return ctx.data_dir.resolve(session.query(Model).filter_by(name=name).one().artifact_path)


def _score(deployment: Deployment, model: str, dump: Path, *extra: str) -> dict:
    done = run_cli(["score", "--model", model, str(dump), "--shard-size", "100", *extra, "--wait", "--format", "json"],
                   deployment.env, check=False)
    assert done.returncode == 1, done.stderr[-3000:]  # --wait reports the failed job
    return json.loads(done.stdout)


def test_a_poisoned_shard_stops_after_max_attempts(faulty: Deployment, textures) -> None:
    _, dump = textures
    _train(faulty, textures, "poisoned")
    # The database refuses every scored row (a heat-map write that fails no longer fails a shard:
    # its row keeps the score), so each attempt fails at its write; the error rows written when
    # the shard gives up still go in.
    database = sqlite3.connect(faulty.env["ADQUEUE_DATABASE_URL"].removeprefix("sqlite:///"))
    database.execute("CREATE TRIGGER poison BEFORE INSERT ON results WHEN NEW.error IS NULL "
                     "BEGIN SELECT RAISE(ABORT, 'poisoned by the test'); END")
    database.commit()
    try:
        summary = _score(faulty, "poisoned", dump)
    finally:
        database.execute("DROP TRIGGER poison")
        database.commit()
        database.close()
    files = sorted(p.name for p in dump.iterdir())
    assert summary["status"] == "failed" and summary["shards_failed"] == 1
    assert summary["n_failed"] == len(files) and "1 shard(s) failed after 2 attempt(s)" in summary["error"]
    rows = run_json(["results", str(summary["job_id"])], faulty.env)
    assert sorted(Path(r["path"]).name for r in rows) == files  # every image has a row...
    assert all(r["error"].startswith("shard failed:") for r in rows)  # ...saying why
    with _store(faulty.env).store.session() as session:
        assert session.query(Shard).filter_by(job_id=summary["job_id"]).one().attempts == 2
        assert session.query(Run).filter_by(job_id=summary["job_id"], kind="shard").count() == 2


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_broken_model_file_fails_the_job_at_once(faulty: Deployment, textures, damage: str) -> None:
    _, dump = textures
    artifact = _train(faulty, textures, f"broken-{damage}")
    if damage == "missing":
        artifact.unlink()
    else:
        artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    summary = _score(faulty, f"broken-{damage}", dump)
    expected = "model file missing" if damage == "missing" else f"changed since broken-{damage}:1 was registered"
    assert summary["status"] == "failed" and expected in summary["error"]
    with _store(faulty.env).store.session() as session:  # one run, no retries, nothing left open
        assert session.query(Run).filter_by(job_id=summary["job_id"], kind="shard").count() == 1
        statuses = {s.status for s in session.query(Shard).filter_by(job_id=summary["job_id"])}
        assert statuses == {"failed"}
