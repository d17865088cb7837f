"""The end of a sharded job, once every shard is closed.

A score job simply ends, in the same step that notices its last shard closed. An evaluate job
has a final step of its own, run as its own task (`run_finish`) under a lease: it recomputes the
metrics from scratch from the results table and the anomaly maps its shards left under the data
dir, and replaces whatever an earlier, crashed finishing stored. Running it twice is harmless,
so the reconciler can simply run it again when a worker died in the middle.
"""

from __future__ import annotations

import logging
import shutil
import traceback
from typing import TYPE_CHECKING

from adqueue.core.failpoints import failpoint
from adqueue.jobs.context import Context
from adqueue.jobs.leases import DB_RETRY_S, JobProgress, LeaseLost, lease_until
from adqueue.store.models import Job, JobStatus
from adqueue.store.transitions import claim_finish, close_if_complete, end_job_run, finish_with_metrics

if TYPE_CHECKING:
    from adqueue.jobs.ports import Dispatcher

log = logging.getLogger(__name__)


def after_shard_closed(ctx: Context, job_id: int, dispatcher: Dispatcher) -> str | None:
    """End the job if that was its last open shard (score), or send its finishing (evaluate).

    Returns the status a score job ended with, "finish" if a finishing was sent, else None."""
    step = ctx.store.transaction(lambda session: close_if_complete(session, job_id), retry_s=DB_RETRY_S)
    if step == "finish":
        dispatcher.enqueue_finish(job_id)
    return step


def run_finish(ctx: Context, job_id: int, *, worker: str) -> str | None:
    """Compute and store an evaluate job's metrics, then end it. Returns its final status, or
    None if there was nothing to do (finished already, or another run holds it)."""
    held = ctx.store.transaction(lambda session: claim_finish(session, job_id, worker, lease_until=lease_until(ctx)),
                                 retry_s=DB_RETRY_S)
    if held is None:
        return None
    if held.attempts > ctx.settings.max_attempts:
        error = f"finishing gave up after {held.attempts - 1} attempt(s): the worker was lost each time"
        with ctx.store.session() as session:
            end_job_run(session, held, status=JobStatus.FAILED, error=error)
        return JobStatus.FAILED
    from adqueue.pipeline.evaluate import compute_job_metrics  # numpy/sklearn only when needed

    progress = JobProgress(ctx, held, counts=False)  # the job's counts are its images'
    try:
        failpoint("finish.metrics")
        metrics = compute_job_metrics(ctx, job_id, progress=progress)
        with ctx.store.session() as session:
            job = session.get_one(Job, job_id)
            dataset, model_id = job.source, job.model_id
        assert model_id is not None, "evaluate jobs always have a model"
        status = ctx.store.transaction(
            lambda session: finish_with_metrics(session, held, metrics, dataset=dataset, model_id=model_id),
            retry_s=DB_RETRY_S)
        if status is None:
            raise LeaseLost(f"finishing of job {job_id} lost its lease")
    except LeaseLost as exc:
        log.warning("%s; its metrics were not stored", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - recorded on the job, never lost in a log only
        log.error("metrics for job %s failed:\n%s", job_id, traceback.format_exc())
        with ctx.store.session() as session:
            end_job_run(session, held, status=JobStatus.FAILED, error=f"metrics failed: {exc}")
        return JobStatus.FAILED
    if status == JobStatus.DONE:  # a failed job keeps its maps: `resume` reruns only what failed
        shutil.rmtree(ctx.data_dir.eval_maps_dir(job_id), ignore_errors=True)
    return status
