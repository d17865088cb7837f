"""Celery tasks: each a few lines handing over to the service layer."""

from __future__ import annotations

import logging

from celery import Task, shared_task

from adqueue.service.scoring import ShardOutcome, run_shard
from adqueue.service.training import run_train_job
from workers.app import TASK_SCORE_SHARD, TASK_TRAIN
from workers.runtime import SqlProgress, current_runtime

log = logging.getLogger(__name__)
MAX_RETRY_DELAY_S = 300.0


@shared_task(name=TASK_TRAIN, bind=True, ignore_result=True)
def train(self: Task, job_id: int) -> str:
    runtime = current_runtime()
    outcome = run_train_job(runtime.ctx, job_id, progress=SqlProgress(runtime.ctx, job_id), device=runtime.device)
    log.info("train job %s: %s", job_id, outcome.value)
    return outcome.value


@shared_task(name=TASK_SCORE_SHARD, bind=True, ignore_result=True, max_retries=None)
def score_shard(self: Task, shard_id: int) -> str:
    runtime = current_runtime()
    outcome = run_shard(runtime.ctx, shard_id, models=runtime.models, worker=runtime.name)
    if outcome is ShardOutcome.RETRY:
        delay = min(runtime.settings.retry_delay_s * 4**self.request.retries, MAX_RETRY_DELAY_S)
        raise self.retry(countdown=delay)
    return outcome.value
