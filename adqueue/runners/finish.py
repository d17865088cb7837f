"""An evaluate job's final step, once every shard is closed: its metrics, under a lease.

The metrics are recomputed from scratch from the results table and the anomaly maps the shards
left under the data dir, and replace whatever an earlier, crashed finishing stored. Running it
twice is harmless, so the reconciler can simply run it again when a worker died in the middle.
"""

from __future__ import annotations

import logging
import shutil
import traceback
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from adqueue.core.failpoints import failpoint
from adqueue.jobs.context import Context
from adqueue.jobs.leases import DB_RETRY_S, JobProgress, LeaseLost, lease_until
from adqueue.runners.lease import JobRun, Outcome
from adqueue.store.models import Job, JobStatus, Model, Result, Shard, ShardStatus
from adqueue.store.transitions import ClaimedJob, claim_finish, finish_with_metrics

log = logging.getLogger(__name__)


class FinishRun(JobRun):
    def claim(self, session: Session) -> ClaimedJob | None:
        return claim_finish(session, self.job_id, self.worker, lease_until=lease_until(self.ctx))

    def give_up_reason(self, held: ClaimedJob) -> str:
        return f"finishing gave up after {held.attempts - 1} attempt(s): the worker was lost each time"

    def work(self, held: ClaimedJob) -> Outcome:
        ctx, job_id = self.ctx, self.job_id
        progress = JobProgress(ctx, held, counts=False)  # the job's counts are its images'
        failpoint("finish.metrics")
        metrics = _job_metrics(ctx, job_id, progress)
        with ctx.store.session() as session:
            job = session.get_one(Job, job_id)
            dataset, model_id = job.source, job.model_id
        assert model_id is not None, "evaluate jobs always have a model"
        status = ctx.store.transaction(
            lambda session: finish_with_metrics(session, held, metrics, dataset=dataset, model_id=model_id),
            retry_s=DB_RETRY_S)
        if status is None:
            raise LeaseLost(f"finishing of job {job_id} lost its lease")
        return Outcome.DONE if status == JobStatus.DONE else Outcome.FAILED

    def completed(self, held: ClaimedJob) -> None:
        # Only a done job: a failed one keeps its maps, since `resume` reruns only what failed.
        shutil.rmtree(self.ctx.data_dir.eval_maps_dir(self.job_id), ignore_errors=True)

    def lost(self, held: ClaimedJob, exc: LeaseLost) -> None:
        log.warning("%s; its metrics were not stored", exc)

    def failed(self, held: ClaimedJob, exc: Exception) -> Outcome:
        log.error("metrics for job %s failed:\n%s", self.job_id, traceback.format_exc())
        return self.fail_job(held, f"metrics failed: {exc}")


def run_finish(ctx: Context, job_id: int, *, worker: str) -> Outcome:
    """Compute and store an evaluate job's metrics, then end it (SKIPPED: finished already, or
    another run holds it)."""
    return FinishRun(ctx, job_id, worker=worker).run()


def _job_metrics(ctx: Context, job_id: int, progress: JobProgress) -> dict[str, float]:
    # numpy, scipy and scikit-learn only once a finishing runs: `adqueue reconcile` imports this module.
    from adqueue.pipeline.evaluate import EvaluatedImage, compute_metrics

    with ctx.store.session() as session:
        job = session.get_one(Job, job_id)
        threshold = session.get_one(Model, job.model_id).threshold
        rows = [EvaluatedImage(*row) for row in session.execute(
            select(Result.path, Result.label, Result.defect, Result.score, Result.scores)
            .where(Result.job_id == job_id, Result.score.is_not(None), Result.label.is_not(None))
            .order_by(Result.path)
        )]
        masks = {
            item[0]: item[3]
            for (items,) in session.execute(select(Shard.items).where(Shard.job_id == job_id))
            for item in items
        }
        # The maps of the run that closed each shard; a copy that lost its lease left others.
        map_files: list[Path] = [
            ctx.data_dir.eval_maps_file(job_id, seq, run_id)
            for seq, run_id in session.execute(
                select(Shard.seq, Shard.run_id).where(Shard.job_id == job_id, Shard.status == ShardStatus.DONE)
                .order_by(Shard.seq))
            if run_id is not None  # a done shard always has the run that closed it
        ]
    return compute_metrics(rows, masks, map_files, threshold, progress)
