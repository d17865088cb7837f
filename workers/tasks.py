"""Celery tasks: each a few lines handing over to a runner (adqueue/runners)."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.worker import state as worker_state

from adqueue.runners.finish import run_finish
from adqueue.runners.shard import run_shard
from adqueue.runners.train import run_train_job
from adqueue.workers import metrics
from adqueue.workers.app import TASK_FINISH, TASK_SCORE_SHARD, TASK_TRAIN
from adqueue.workers.runtime import current_runtime

log = logging.getLogger(__name__)


def _cold_shutdown() -> bool:
    """Celery's cold shutdown (SIGQUIT) raises into the running task (the solo pool "does not
    implement kill_job"); by then it has set this flag."""
    return bool(worker_state.should_terminate)


@shared_task(name=TASK_TRAIN, ignore_result=True)
def train(job_id: int) -> str:
    runtime = current_runtime()
    outcome = run_train_job(runtime.ctx, job_id, worker=runtime.name, device=runtime.device)
    metrics.job_run_ended("train", outcome.value, runtime.name)
    runtime.notifier.kick()
    log.info("train job %s: %s", job_id, outcome.value)
    return outcome.value


@shared_task(name=TASK_SCORE_SHARD, ignore_result=True)
def score_shard(shard_id: int) -> str:
    runtime = current_runtime()
    observed = metrics.ShardMetrics(runtime.ctx, shard_id, runtime.name) if metrics.enabled() else None
    outcome = run_shard(runtime.ctx, shard_id, models=runtime.models, worker=runtime.name, dispatcher=runtime.dispatcher,
                        on_batch=observed.batch if observed else None, stopping=_cold_shutdown)
    if observed:
        observed.ended(outcome.value)
    runtime.notifier.kick()  # the shard may have ended its job
    log.info("shard %s: %s", shard_id, outcome.value)
    return outcome.value


@shared_task(name=TASK_FINISH, ignore_result=True)
def finish_job(job_id: int) -> str:
    runtime = current_runtime()
    outcome = run_finish(runtime.ctx, job_id, worker=runtime.name)
    metrics.job_run_ended("finish", outcome.value, runtime.name)
    runtime.notifier.kick()
    log.info("finishing of job %s: %s", job_id, outcome.value)
    return outcome.value
