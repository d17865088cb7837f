"""Reading verbs: jobs, results, models, sql."""

from __future__ import annotations

import click

from adqueue.cli import cli, settings_from
from adqueue.cli.output import emit_object, emit_rows, format_option
from adqueue.errors import AdqueueError
from adqueue.service.context import Context
from adqueue.store import queries


def _context(ctx: click.Context) -> Context:
    return Context(settings_from(ctx))


@cli.command()
@click.argument("job_id", required=False, type=int)
@click.option("--limit", default=20, show_default=True, help="How many recent jobs to list.")
@format_option
@click.pass_context
def jobs(ctx: click.Context, job_id: int | None, limit: int, fmt: str) -> None:
    """List recent jobs, or show one JOB_ID in detail (status, counts, shards, metrics)."""
    context = _context(ctx)
    with context.store.session() as session:
        if job_id is None:
            rows = queries.list_jobs(session, limit)
            emit_rows(rows, ["job_id", "kind", "status", "model", "n_total", "n_done", "n_failed",
                             "created_at", "error"], fmt)
            return
        summary = queries.job_summary(session, job_id)
        metrics = queries.job_metrics(session, job_id)
    emit_object({**summary, **metrics}, fmt, title=f"job {job_id}")


@cli.command()
@click.argument("job_id", type=int)
@click.option("--anomalous", is_flag=True, help="Only images flagged as anomalous.")
@click.option("--top", type=int, default=None, help="Only the N highest scores.")
@format_option
@click.pass_context
def results(ctx: click.Context, job_id: int, anomalous: bool, top: int | None, fmt: str) -> None:
    """Per-image results of a score or evaluate job, highest score first."""
    context = _context(ctx)
    with context.store.session() as session:
        rows = queries.job_results(session, job_id, anomalous=anomalous, top=top)
    for row in rows:
        if row["heatmap_path"]:
            row["heatmap_path"] = str(context.data_dir.resolve(row["heatmap_path"]))
    columns = ["path", "score", "is_anomaly", "heatmap_path", "error"]
    if fmt != "table":
        columns += ["width", "height", "sha256", "label", "defect", "scores"]
    emit_rows(rows, columns, fmt)


@cli.command()
@format_option
@click.pass_context
def models(ctx: click.Context, fmt: str) -> None:
    """Trained models and versions, with their threshold and latest image AUROC."""
    context = _context(ctx)
    with context.store.session() as session:
        rows = queries.list_models(session)
    emit_rows(rows, ["model", "detector", "backbone", "threshold", "image_auroc", "created_at"], fmt)


@cli.command()
@click.argument("statement")
@click.option("--max-rows", type=int, default=None, help="Stop after this many rows.")
@format_option
@click.pass_context
def sql(ctx: click.Context, statement: str, max_rows: int | None, fmt: str) -> None:
    """Run one read-only SQL statement (SELECT/WITH/EXPLAIN) on the results database.

    Tables: models, jobs, shards, results, metrics (see README). Writes are refused, by this
    command and by a read-only database connection."""
    context = _context(ctx)
    context.store  # noqa: B018 - make sure the schema exists before the first query
    columns, rows = queries.run_read_only(context.settings.database_url, statement, max_rows=max_rows)
    emit_rows([dict(zip(columns, row, strict=True)) for row in rows], columns, fmt)


@cli.command()
@click.argument("name", required=False)
@format_option
def detectors(name: str | None, fmt: str) -> None:
    """The detectors and their `--set` settings with defaults (all of them, or NAME's)."""
    import dataclasses
    import sys

    from adqueue.detectors import registry
    from adqueue.service.training import TRAIN_KEYS

    rows = []
    for detector in [name] if name else registry.names():
        try:
            cls = registry.detector_class(detector)
        except ValueError as exc:
            raise AdqueueError(str(exc)) from None
        summary = ((sys.modules[cls.__module__].__doc__ or "").strip().splitlines() or [""])[0]
        for item in dataclasses.fields(cls.Config):
            if item.name in TRAIN_KEYS:
                continue  # set through the training key of the same name
            default = item.default if item.default is not dataclasses.MISSING else None
            if isinstance(default, tuple):
                default = ",".join(str(v) for v in default)
            rows.append({"detector": detector, "setting": item.name, "default": default, "about": summary})
    rows += [{"detector": "(training)", "setting": key, "default": value, "about": "any detector"}
             for key, value in TRAIN_KEYS.items()]
    emit_rows(rows, ["detector", "setting", "default"] + (["about"] if fmt != "table" else []), fmt)
