"""The end of a sharded job: whoever closes the last shard finishes it.

Score jobs simply end. Evaluate jobs compute their metrics first, from the results table (image
scores, labels) and the anomaly maps the shards left under the data dir, store them in `metrics`
and delete the maps.
"""

from __future__ import annotations

import logging
import shutil
import traceback

from sqlalchemy import exists, select

from adqueue.service.context import Context
from adqueue.store.models import Job, JobStatus, Metric, Shard, ShardStatus
from adqueue.store.writes import claim_job_finish, end_job

log = logging.getLogger(__name__)


def finish_if_complete(ctx: Context, job_id: int) -> str | None:
    """Finish the job if every shard is closed. Returns the final status if this call ended it."""
    with ctx.store.session() as session:
        status = claim_job_finish(session, job_id)
    if status != JobStatus.FINISHING:
        return status
    from adqueue.service.evaluation import compute_job_metrics  # numpy/sklearn only when needed

    try:
        metrics = compute_job_metrics(ctx, job_id)
    except Exception as exc:  # noqa: BLE001 - recorded on the job, never lost in a log only
        log.error("metrics for job %s failed:\n%s", job_id, traceback.format_exc())
        with ctx.store.session() as session:
            end_job(session, job_id, status=JobStatus.FAILED, error=f"metrics failed: {exc}")
        return JobStatus.FAILED
    with ctx.store.session() as session:
        job = session.get_one(Job, job_id)
        session.add_all(
            Metric(model_id=job.model_id, job_id=job_id, name=name, value=value, dataset=job.source)
            for name, value in metrics.items()
        )
        failed = session.scalar(
            select(exists().where(Shard.job_id == job_id, Shard.status == ShardStatus.FAILED))
        )
        end_job(
            session, job_id,
            status=JobStatus.FAILED if failed else JobStatus.DONE,
            error="some shards failed; metrics cover the images that were scored" if failed else None,
        )
    shutil.rmtree(ctx.data_dir.eval_maps_dir(job_id), ignore_errors=True)
    return JobStatus.FAILED if failed else JobStatus.DONE
