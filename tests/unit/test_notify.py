"""Alarms and the notification of a job's end: the statistics, exactly one POST per end (whoever ends
the job: the CLI, a cancel, a reconciler), retries, and a receiver that is not there."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from scipy.stats import betabinom

from adqueue.core.clock import utcnow
from adqueue.core.config import Settings
from adqueue.jobs.alarms import Calibration, anomaly_rate_alarm, beta_binomial_tail, job_alarms
from adqueue.jobs.context import Context
from adqueue.jobs.drift import Drift
from adqueue.jobs.notify import notify_owed
from adqueue.jobs.reconcile import reconcile
from adqueue.store.models import Job, JobStatus, Model
from adqueue.store.transitions import complete_shard
from benchmarks.harness.cli import FAST_MVG
from tests.helpers.cli import invoke_cli
from tests.helpers.receiver import Receiver, webhook_receiver
from tests.helpers.store import LEASE, claim, job_with_shards

FIELDS = {"job_id", "kind", "status", "model", "source", "n_total", "n_scored", "n_flagged", "n_errors",
          "anomaly_rate", "target_fpr", "drift_ks", "url", "alarms", "text"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as receiver:
        yield receiver


@pytest.mark.parametrize(("k", "n", "a", "b"), [(1, 50, 1, 50), (5, 190, 2, 151), (128, 128, 2, 151),
                                                (3, 1000, 1, 7), (0, 10, 1, 1), (40, 60, 3, 20)])
def test_the_beta_binomial_tail_is_scipys(k: int, n: int, a: float, b: float) -> None:
    assert beta_binomial_tail(k, n, a, b) == pytest.approx(betabinom.sf(k - 1, n, a, b), rel=1e-6, abs=1e-12)


def test_the_anomaly_rate_alarm_allows_for_the_calibration_sets_size() -> None:
    fifty = Calibration(n_images=50, n_above=0, fpr=0.01)
    assert anomaly_rate_alarm(1, 50, fifty) is None  # one unlucky image is no alarm
    mtd = Calibration(n_images=152, n_above=1, fpr=0.01)
    alarm = anomaly_rate_alarm(128, 128, mtd)
    assert alarm is not None and alarm.kind == "anomaly_rate" and "128 of 128" in alarm.message
    assert anomaly_rate_alarm(3, 190, mtd) is None  # 1.6% where 1% was the target, on 152 images: chance
    # Seven calibration images pin the rate down so little (a threshold above all seven still passes
    # more than 30% of normal images one time in 20) that even 25 of 50 is no proof; 40 of 50 is.
    seven = Calibration(n_images=7, n_above=0, fpr=0.01)
    assert anomaly_rate_alarm(25, 50, seven) is None and anomaly_rate_alarm(40, 50, seven) is not None
    assert Calibration.of_model({"train": {"fpr": 0.01}, "calibration": {"n_images": 4, "scores": [1, 2, 3, 4]}},
                                2.5) == Calibration(4, 2, 0.01)


def test_every_kind_of_alarm() -> None:
    drifted = Drift(statistic=0.5, n_night=80, n_calibration=60)
    alarms = job_alarms(kind="score", status="failed", error="1 shard(s) failed", n_total=100, n_scored=90,
                        n_flagged=90, n_errors=10, calibration=Calibration(50, 0, 0.01), drift=drifted)
    assert [a.kind for a in alarms] == ["failed", "anomaly_rate", "drift", "errors"]
    quiet = job_alarms(kind="score", status="done", error=None, n_total=100, n_scored=99, n_flagged=1, n_errors=1,
                       calibration=Calibration(50, 0, 0.01), drift=Drift(0.1, 80, 60))
    assert quiet == []
    cancelled = job_alarms(kind="train", status="cancelled", error="cancelled by x", n_total=0, n_scored=0,
                           n_flagged=0, n_errors=0, calibration=None, drift=None)
    assert [a.as_dict() for a in cancelled] == [{"kind": "cancelled", "message": "cancelled by x"}]


def test_one_notification_per_job_end_from_the_cli(tmp_path: Path, textures, receiver: Receiver) -> None:
    root, dump = textures
    data = tmp_path / "data"
    env = {"ADQUEUE_NOTIFY_URL": receiver.url, "ADQUEUE_PUBLIC_URL": "http://review.example:8080/"}
    trained = json.loads(invoke_cli(data, "train", "--data", str(root), "--name", "tex", *FAST_MVG,
                                    "--format", "json", **env).stdout)
    (train_post,) = receiver.of_job(trained["job_id"])
    assert train_post["kind"] == "train" and train_post["status"] == "done" and train_post["alarms"] == []

    scored = json.loads(invoke_cli(data, "score", "--model", "tex", str(dump), "--heatmaps", "none",
                                   "--format", "json", **env).stdout)
    (post,) = receiver.of_job(scored["job_id"])
    assert set(post) >= FIELDS
    assert post["status"] == "done" and post["model"] == "tex:1" and post["source"] == scored["source"]
    assert post["n_total"] == 18 and post["n_errors"] == 2 and post["n_scored"] == 16
    assert post["n_flagged"] == scored["n_flagged"] and post["target_fpr"] == 0.01
    assert post["url"] == f"http://review.example:8080/jobs/{scored['job_id']}"
    assert [a["kind"] for a in post["alarms"]] == ["errors"]  # 2 of 18 files unreadable: above 5%
    assert scored["alarms"] == post["alarms"]  # --format json carries the same alarms

    # A job that fails (its model file is gone) and one that is cancelled: one notification each.
    with Context(Settings.load(data_dir=data, broker_url="")).store.session() as session:
        artifact = session.query(Model.artifact_path).filter(Model.name == "tex").scalar()
    (data / artifact).rename(data / (artifact + ".moved"))
    failed = invoke_cli(data, "score", "--model", "tex", str(dump), "--format", "json", ok=False, **env)
    failed_id = json.loads(failed.stdout)["job_id"]
    (post,) = receiver.of_job(failed_id)
    assert post["status"] == "failed" and post["alarms"][0]["kind"] == "failed"

    ctx = Context(Settings.load(data_dir=data, broker_url=""))
    queued_id, _ = job_with_shards(ctx.store)
    invoke_cli(data, "cancel", str(queued_id), **env)
    (post,) = receiver.of_job(queued_id)
    assert post["status"] == "cancelled" and [a["kind"] for a in post["alarms"]] == ["cancelled"]

    # Nothing is sent twice: later verbs, reconciler passes and senders find nothing owed.
    invoke_cli(data, "reconcile", **env)
    assert notify_owed(ctx) == 0
    assert [len(receiver.of_job(j)) for j in (trained["job_id"], scored["job_id"], failed_id, queued_id)] == [1] * 4
    listed = json.loads(invoke_cli(data, "jobs", "--format", "json").stdout)
    by_id = {row["job_id"]: row for row in listed}
    assert by_id[scored["job_id"]]["n_flagged"] == scored["n_flagged"]
    assert [a["kind"] for a in by_id[queued_id]["alarms"]] == ["cancelled"]

    # Resumed and ended again: a second end, a second notification.
    (data / (artifact + ".moved")).rename(data / artifact)
    invoke_cli(data, "resume", str(failed_id), **env)
    posts = receiver.of_job(failed_id)
    assert [p["status"] for p in posts] == ["failed", "done"]


def test_a_job_a_reconciler_ends_is_notified_once_by_racing_senders(tmp_path: Path, receiver: Receiver) -> None:
    settings = Settings.load(data_dir=tmp_path, broker_url="").with_overrides(notify_urls=(receiver.url,),
                                                                              lease_s=LEASE.total_seconds())
    ctx = Context(settings)
    job_id, (shard,) = job_with_shards(ctx.store, 1)
    claimed = claim(ctx.store, shard)
    with ctx.store.session() as session:
        complete_shard(session, claimed, [], n_ok=2, n_failed=0)  # ... and the worker dies here
    assert reconcile(ctx, {}, worker="r").jobs_ended == 1
    senders = [threading.Thread(target=notify_owed, args=(Context(settings),)) for _ in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    (post,) = receiver.of_job(job_id)
    assert post["status"] == "done" and post["n_total"] == 0
    with ctx.store.session() as session:
        job = session.get_one(Job, job_id)
        assert job.notified_at is not None and job.notify_attempts == 0 and job.notification["sent"] == [receiver.url]


def test_a_failing_receiver_is_retried_with_backoff(tmp_path: Path, receiver: Receiver) -> None:
    settings = Settings.load(data_dir=tmp_path, broker_url="").with_overrides(
        notify_urls=(receiver.url,), notify_retry_delay_s=0.05)
    ctx = Context(settings)
    job_id, _ = job_with_shards(ctx.store, 1)
    with ctx.store.session() as session:
        session.execute(Job.__table__.update().where(Job.id == job_id)
                        .values(status=JobStatus.DONE, finished_at=utcnow()))
    calls: list[str] = []

    def flaky(url: str, body: bytes) -> None:
        calls.append(url)
        if len(calls) < 3:
            raise ConnectionError("receiver restarting")
        from adqueue.jobs.notify import post_json

        post_json(url, body)

    from adqueue.jobs.notify import notify_until_settled

    notify_until_settled(ctx, budget_s=5, post=flaky)
    assert len(calls) == 3 and len(receiver.of_job(job_id)) == 1


def test_an_unreachable_receiver_leaves_the_job_done_and_logs_one_line(
        tmp_path: Path, textures, caplog: pytest.LogCaptureFixture) -> None:
    root, dump = textures
    data = tmp_path / "data"
    env = {"ADQUEUE_NOTIFY_URL": "http://127.0.0.1:9/nobody-listens", "ADQUEUE_NOTIFY_ATTEMPTS": "3",
           "ADQUEUE_NOTIFY_RETRY_DELAY": "0.05"}
    invoke_cli(data, "train", "--data", str(root), "--name", "tex", *FAST_MVG, **env)
    with caplog.at_level(logging.WARNING, logger="adqueue.jobs.notify"):
        caplog.clear()
        out = json.loads(invoke_cli(data, "score", "--model", "tex", str(dump), "--heatmaps", "none",
                                    "--format", "json", **env).stdout)
    assert out["status"] == "done"
    lines = [r.getMessage() for r in caplog.records if r.name == "adqueue.jobs.notify"]
    assert len(lines) == 1 and "nobody-listens failed after 3 attempt(s)" in lines[0], lines
