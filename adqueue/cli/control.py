"""Verbs that steer jobs: cancel, resume, reconcile."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from adqueue.cli import cli, settings_from
from adqueue.cli.output import emit_object, format_option, info
from adqueue.cli.submit import device_option, report_job, run_with_dispatcher, wait_option
from adqueue.jobs.context import Context

if TYPE_CHECKING:
    from adqueue.jobs.ports import Dispatcher
    from adqueue.jobs.submit import Submitted


@cli.command()
@click.argument("job_id", type=int)
@click.pass_context
def cancel(ctx: click.Context, job_id: int) -> None:
    """Cancel JOB_ID: its queued shards never run, running ones stop at their next batch and write
    nothing, and the job ends `cancelled`. What was already scored stays; `adqueue resume JOB_ID`
    runs the rest later."""
    from adqueue.jobs.control import cancel_job
    from adqueue.jobs.notify import notify_until_settled

    context = Context(settings_from(ctx, existing=True))
    cancel_job(context, job_id)
    info(f"job {job_id} cancelled; `adqueue resume {job_id}` runs what is left")
    notify_until_settled(context)


@cli.command()
@click.argument("job_id", type=int)
@device_option
@wait_option
@format_option
@click.pass_context
def resume(ctx: click.Context, job_id: int, device: str | None, wait: bool, fmt: str) -> None:
    """Run again whatever of a failed, cancelled or stuck JOB_ID is not done: failed and cancelled
    shards (with a fresh attempt budget), shards whose worker was lost, messages the broker lost,
    an unfinished submission, a training, an evaluation's metrics. What is done stays done.

    With a broker the work goes to the workers; without one it runs in this process now."""
    from adqueue.jobs.control import resume_job
    from adqueue.jobs.submit import describe_job

    def resume_and_describe(context: Context, dispatcher: Dispatcher) -> Submitted:
        resume_job(context, dispatcher, job_id)
        return describe_job(context, job_id)

    context, submitted = run_with_dispatcher(ctx, device, resume_and_describe, existing=True)
    report_job(context, submitted, fmt, wait)


@cli.command()
@format_option
@click.pass_context
def reconcile(ctx: click.Context, fmt: str) -> None:
    """One reconciler pass now (every worker runs one every ADQUEUE_RECONCILE_INTERVAL seconds):
    take back work whose lease expired, re-send messages the broker lost, end jobs whose shards
    are all closed, continue submissions whose submitter died, send the notifications of job ends
    still owed (ADQUEUE_NOTIFY_URL). Without a broker it ends what it can and marks jobs whose
    process died for `adqueue resume`."""
    from adqueue.jobs.reconcile import reconcile as reconcile_pass

    settings = settings_from(ctx, existing=True)
    context = Context(settings)
    dispatchers: dict[str | None, Dispatcher] = {}
    if settings.embedded:  # an evaluation whose process died after its last shard finishes here (torch-free)
        from adqueue.core.progress import NullProgress
        from adqueue.jobs.ports import NullScoreProgress
        from adqueue.runners.inline import InlineDispatcher

        dispatchers[None] = InlineDispatcher(context, train_progress=NullProgress, score_progress=NullScoreProgress)
    else:
        from adqueue.workers.producer import CeleryDispatcher

        dispatchers[settings.queue] = CeleryDispatcher(settings)
    report = reconcile_pass(context, dispatchers, worker="adqueue-reconcile")
    from adqueue.jobs.notify import notify_until_settled

    notify_until_settled(context)  # the ends this pass brought, and notifications whose retry fell due
    if fmt == "table":
        info(f"reconciled: {report.describe()}")
    else:
        emit_object(report.as_dict(), fmt)

