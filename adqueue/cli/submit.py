"""Submitting verbs: train, score, evaluate. Each prints the new job's id (or a JSON object).

With a broker these only write SQL and send messages, so they import neither torch nor progress
bars; what runs jobs in this process (the embedded default) is imported when it is about to.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from adqueue.cli import cli, settings_from
from adqueue.cli.output import emit_object, format_option, info
from adqueue.core.errors import AdqueueError
from adqueue.data.sources import SPLITS
from adqueue.detectors import registry
from adqueue.jobs.context import Context
from adqueue.store.queries import job_metrics, job_summary, model_warnings

if TYPE_CHECKING:
    from adqueue.cli.progress import ScoreBar, TrainBar
    from adqueue.jobs.submit import Submitted

wait_option = click.option("--wait", is_flag=True, help="Show progress until the job ends; exit 1 if it "
                           "failed or was cancelled, 3 if nothing moved for ADQUEUE_STALL_TIMEOUT seconds with "
                           "no worker working. (Without a broker the job always runs to the end right away.)")
device_option = click.option("--device", default=None, help="auto, cpu, cuda or cuda:N for in-process runs "
                             "[env ADQUEUE_DEVICE; default auto].")
shard_option = click.option("--shard-size", default=256, show_default=True, type=int,
                            help="Images per shard (one task). Keep a shard to seconds or minutes of work.")
heatmaps_option = click.option("--heatmaps", type=click.Choice(["flagged", "all", "none"]), default="flagged",
                               show_default=True, help="Which images get a heat-map overlay (a JPEG under the data dir).")
split_option = click.option("--split", type=click.Choice(SPLITS), default=None,
                            help="Rows of a manifest CSV / MVTec root to use.")


def _parse_settings(pairs: tuple[str, ...], backbone: str | None) -> dict[str, str]:
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise AdqueueError(f"--set expects KEY=VALUE, not {pair!r}")
        settings[key.strip()] = value.strip()
    if backbone:
        settings["backbone"] = backbone
    return settings


def run_with_dispatcher(ctx: click.Context, device: str | None, submit: Any, *, existing: bool = False,
                        ) -> tuple[Context, Submitted]:
    settings = settings_from(ctx, device=device, existing=existing)
    context = Context(settings)
    bars: list[Any] = []

    def train_bar() -> TrainBar:
        from adqueue.cli.progress import TrainBar

        bars.append(TrainBar())
        return bars[-1]

    def score_bar() -> ScoreBar:
        from adqueue.cli.progress import ScoreBar

        return ScoreBar()

    from adqueue.cli.dispatch import make_dispatcher
    from adqueue.jobs.interrupts import signals_interrupt

    dispatcher = make_dispatcher(context, train_progress=train_bar, score_progress=score_bar)
    try:
        if settings.embedded:  # the job runs here: a signal must leave it resumable, not `running`
            _heal_embedded(context)
            with signals_interrupt():
                submitted = submit(context, dispatcher)
        else:
            submitted = submit(context, dispatcher)
    finally:
        for bar in bars:
            bar.stop()
    return context, submitted


def _heal_embedded(context: Context) -> None:
    """No worker runs a reconciler on the embedded default: each run does one pass first, so a
    job whose process was killed (its lease expired) is marked for `resume`, not left `running`."""
    from adqueue.jobs.reconcile import reconcile

    report = reconcile(context, {}, worker="adqueue-cli")
    if report.embedded_stopped:
        info(f"{report.embedded_stopped} earlier job(s) whose process was stopped are marked failed: "
             "`adqueue jobs` lists them, `adqueue resume JOB` completes one")


def report_job(context: Context, submitted: Submitted, fmt: str, wait: bool) -> dict[str, Any]:
    """Print the job id (or JSON), follow it when asked, and exit 1 if it failed or was cancelled."""
    summary: dict[str, Any]
    if fmt != "json":
        click.echo(submitted.job_id)  # first, so a script has it even if the wait gives up
    if submitted.masks is not None and submitted.masks.count:
        info(submitted.masks.describe())
    if context.settings.embedded or not wait:
        with context.store.session() as session:
            summary = job_summary(session, submitted.job_id)
    else:
        from adqueue.cli.progress import wait_for_job

        info(f"job {submitted.job_id} queued ({submitted.kind}); following it, Ctrl-C stops following only")
        summary = wait_for_job(context, submitted.job_id)
    summary = {**summary, **job_outcome(context, summary)}
    metrics = outcome_metrics(context, summary)
    if fmt == "json":
        emit_object({**submitted.as_dict(), **summary, **metrics}, "json")
    else:
        describe_outcome(context, summary, metrics, fmt)
    if summary["status"] in ("failed", "cancelled"):
        info(f"[red]job {submitted.job_id} {summary['status']}:[/red] {summary.get('error')}")
        sys.exit(1)
    return summary


def job_outcome(context: Context, summary: dict[str, Any]) -> dict[str, Any]:
    """An ended job's flagged count and alarms, once its end's notification is done (ADQUEUE_NOTIFY_URL:
    sent, or left to a reconciler after a few seconds of retries; the alarms are computed either way)."""
    from adqueue.jobs.notify import notify_until_settled
    from adqueue.store.notifications import outcome_fields

    if summary["status"] in ("done", "failed", "cancelled"):
        notify_until_settled(context)
    with context.store.session() as session:
        return outcome_fields(session, summary["job_id"])


def describe_alarms(alarms: list[dict[str, str]]) -> None:
    from rich.markup import escape

    for alarm in alarms:
        if alarm["kind"] not in ("failed", "cancelled"):  # those two are said by the exit line
            info(f"[red]alarm {alarm['kind']}:[/red] {escape(alarm['message'])}")


def outcome_metrics(context: Context, summary: dict[str, Any]) -> dict[str, Any]:
    """An evaluate job's metrics; a train job's are its self-check on synthetic defects (synthetic_auroc)."""
    if summary["kind"] not in ("evaluate", "train") or summary["status"] not in ("done", "failed"):
        return {}
    with context.store.session() as session:
        return job_metrics(session, summary["job_id"])


def describe_outcome(context: Context, summary: dict[str, Any], metrics: dict[str, Any], fmt: str) -> None:
    """What an ended job concluded, for people, once its progress bars are gone (`adqueue demo` too)."""
    status = summary["status"]
    if summary["kind"] == "train" and status == "done":
        from rich.markup import escape

        info(f"trained model [bold]{summary['model']}[/bold] (job {summary['job_id']})")
        # Training's warnings are shown here, from the model row, and only here: the log of the
        # process that trained leaves them out (core/logs.py), a worker's log keeps them.
        with context.store.session() as session:
            warnings = model_warnings(session, summary["model"])
        for warning in warnings:
            info(f"[yellow]warning:[/yellow] {escape(warning)}")
    elif summary["kind"] in ("score", "evaluate"):
        flagged = f"{summary['n_flagged']} flagged, " if "n_flagged" in summary else ""
        info(f"{summary['kind']} job {summary['job_id']}: {status}, {summary['n_done']} scored, {flagged}"
             f"{summary['n_failed']} could not be scored, of {summary['n_total']} in {summary['shards']} shard(s)"
             + (f"; {summary['n_skipped']} skipped (scored before, unchanged)" if summary.get("n_skipped") else ""))
    describe_alarms(summary.get("alarms") or [])
    if metrics:
        emit_object(metrics, fmt, title="metrics")


@cli.command()
@click.option("--detector", type=click.Choice(registry.names()), default="mvg", show_default=True,
              help="Which detector to train.")
@click.option("--data", required=True, help="Defect-free images: a folder, an MVTec root (train/good) or "
              "a manifest CSV (rows of --split, default train).")
@click.option("--name", required=True, help="Model name; each training adds a version (NAME:1, NAME:2, ...).")
@click.option("--backbone", default=None, help="Pretrained backbone (default per detector, e.g. "
              "efficientnet_lite0); feature levels follow it unless --set levels=... names them.")
@click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE", help="Detector or training setting, "
              "repeatable: fpr=0.01 (target false-alarm rate), calib_fraction=0.2, seed=0, levels=3,4,5 ... "
              "`adqueue detectors` lists every setting and its default.")
@split_option
@device_option
@wait_option
@format_option
@click.pass_context
def train(ctx: click.Context, detector: str, data: str, name: str, backbone: str | None, pairs: tuple[str, ...],
          split: str | None, device: str | None, wait: bool, fmt: str) -> None:
    """Train a detector on defect-free images and register it as a new model version."""
    from adqueue.jobs.submit import submit_train  # the write side: only for the verbs that write

    settings = _parse_settings(pairs, backbone)
    context, submitted = run_with_dispatcher(ctx, device, lambda c, d: submit_train(
        c, d, detector=detector, data=data, name=name, settings=settings, split=split))
    report_job(context, submitted, fmt, wait)


@cli.command()
@click.argument("path")
@click.option("--model", required=True, help="NAME (latest version) or NAME:VERSION.")
@split_option
@shard_option
@heatmaps_option
@click.option("--skip-scored", is_flag=True, help="Leave out files this model version has scored before and "
              "that have not changed since (same size and mtime, or same SHA-256): for nightly dumps that "
              "overlap. The job counts them (n_skipped); its results hold only the new files.")
@device_option
@wait_option
@format_option
@click.pass_context
def score(ctx: click.Context, path: str, model: str, split: str | None, shard_size: int, heatmaps: str,
          skip_scored: bool, device: str | None, wait: bool, fmt: str) -> None:
    """Score every file under PATH (a folder, MVTec root or manifest CSV) with a trained model.

    Files that are not decodable images get a result row with an error; the job goes on."""
    from adqueue.jobs.submit import submit_score

    context, submitted = run_with_dispatcher(ctx, device, lambda c, d: submit_score(
        c, d, model=model, data=path, split=split, shard_size=shard_size, heatmaps=heatmaps,
        skip_scored=skip_scored))
    report_job(context, submitted, fmt, wait)


@cli.command()
@click.option("--model", required=True, help="NAME (latest version) or NAME:VERSION.")
@click.option("--data", required=True, help="Labeled images: an MVTec root or a manifest CSV.")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@shard_option
@click.option("--heatmaps", type=click.Choice(["flagged", "all", "none"]), default="none", show_default=True,
              help="Which images get a heat-map overlay (a JPEG under the data dir).")
@device_option
@wait_option
@format_option
@click.pass_context
def evaluate(ctx: click.Context, model: str, data: str, split: str, shard_size: int, heatmaps: str,
             device: str | None, wait: bool, fmt: str) -> None:
    """Score a labeled test set and store image AUROC (per defect type too), pixel AUROC and PRO
    where masks exist, and the false-alarm rate and recall at the model's threshold."""
    from adqueue.jobs.submit import submit_evaluate

    context, submitted = run_with_dispatcher(ctx, device, lambda c, d: submit_evaluate(
        c, d, model=model, data=data, split=split, shard_size=shard_size, heatmaps=heatmaps))
    report_job(context, submitted, fmt, wait)
