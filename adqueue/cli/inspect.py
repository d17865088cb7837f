"""Reading verbs: jobs, results, models, sql."""

from __future__ import annotations

import click

from adqueue.cli import cli, settings_from
from adqueue.cli.output import emit_object, emit_rows, format_option
from adqueue.core.errors import AdqueueError
from adqueue.jobs.context import Context
from adqueue.store import queries
from adqueue.store.notifications import ended_alarms, outcome_fields


def _context(ctx: click.Context) -> Context:
    return Context(settings_from(ctx, existing=True))


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
            listed = queries.list_jobs(session, limit, counts=True)
            alarms = ended_alarms(session, [row.id for row in listed])
            rows = [{**row.as_dict(), "n_flagged": row.n_flagged, "alarms": _alarm_cell(alarms.get(row.id), fmt)}
                    for row in listed]
            emit_rows(rows, ["job_id", "kind", "status", "model", "n_total", "n_done", "n_flagged", "n_failed",
                             "alarms", "created_at", "error"], fmt)
            return
        summary = queries.job_summary(session, job_id)
        outcome = outcome_fields(session, job_id)
        metrics = queries.job_metrics(session, job_id)
    if fmt != "json":
        outcome["alarms"] = "; ".join(f"{a['kind']}: {a['message']}" for a in outcome.get("alarms") or []) or None
    emit_object({**summary, **outcome, **metrics}, fmt, title=f"job {job_id}")


def _alarm_cell(alarms: list[dict[str, str]] | None, fmt: str) -> object:
    """The alarms' kinds in a table or CSV cell; the whole list in JSON."""
    if fmt == "json":
        return alarms or []
    return ", ".join(a["kind"] for a in alarms or []) or None


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
    """Trained models and versions, with their threshold, latest image AUROC (evaluate), the AUROC of
    training's self-check on synthetic defects, memory-bank size (patchcore) and training warnings."""
    context = _context(ctx)
    with context.store.session() as session:
        rows = queries.list_models(session)
    if fmt != "json":  # one cell per model in a table or CSV; JSON keeps the list
        rows = [{**row, "warnings": "; ".join(row["warnings"])} for row in rows]
    columns = ["model", "detector", "backbone", "threshold", "image_auroc", "synthetic_auroc", "created_at",
               "warnings"]
    if fmt != "table":
        columns[-1:-1] = ["bank_size", "bank_mb"]
    elif any(row["bank_size"] is not None for row in rows):  # a column only where a model has a memory bank
        rows = [{**row, "bank": None if row["bank_size"] is None else f"{row['bank_size']} rows, {row['bank_mb']} MB"}
                for row in rows]
        columns[-1:-1] = ["bank"]
    emit_rows(rows, columns, fmt)


@cli.command(epilog="""\b
Examples:
  adqueue sql "SELECT path, score FROM results WHERE job_id = 42 AND is_anomaly ORDER BY score DESC"
  adqueue sql --max-rows 0 --timeout 600 --format csv "SELECT * FROM results" > results.csv
""")
@click.argument("statement")
@click.option("--max-rows", type=click.IntRange(min=0), default=None, metavar="N",
              help="Print at most N rows, with a note on stderr when there were more; 0: all rows "
              "[env ADQUEUE_SQL_MAX_ROWS; default 10000].")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="Stop the query after this long; the database enforces it "
              "[env ADQUEUE_SQL_TIMEOUT; default 60].")
@format_option
@click.pass_context
def sql(ctx: click.Context, statement: str, max_rows: int | None, timeout_s: float | None, fmt: str) -> None:
    """Run one read-only SQL statement (SELECT, WITH ... SELECT, EXPLAIN, VALUES, SHOW, TABLE) on the
    results database. Tables: models, jobs, shards, runs, results, metrics, reviews, job_summaries,
    job_score_bins, job_folders, shard_summaries (README, "The SQL schema", lists their columns).

    Writes are refused twice: the statement is checked with a SQL tokenizer (one statement; no
    INSERT/UPDATE/DELETE, also not inside WITH), and the connection is read-only (a read-only
    SQLite file; a READ ONLY PostgreSQL session, dropped to the pg_read_all_data role where the
    login may, so superuser-only functions fail too).

    ADQUEUE_SQL_DATABASE_URL, when set, is the database URL this verb uses instead of --db /
    ADQUEUE_DATABASE_URL: give it a PostgreSQL role that may only read (docker-compose.yml's
    adqueue_reader) before handing this verb to others."""
    from adqueue.store import read_only_sql  # sqlparse: only for this verb

    settings = settings_from(ctx)
    url = settings.sql_database_url
    # A separate reader's URL is never used to migrate (a reader may not): only the main one is.
    if url is None:
        settings.require_data_dir()
        Context(settings).store  # noqa: B018 - make sure the schema exists before the first query
        url = settings.database_url
    elif not url.startswith(("sqlite", "postgresql", "postgres://")):
        raise AdqueueError(f"unsupported ADQUEUE_SQL_DATABASE_URL {url!r}: "
                           "use sqlite:///PATH or postgresql://USER@HOST/DB")
    limit = settings.sql_max_rows if max_rows is None else max_rows
    result = read_only_sql.run_read_only(url, statement, max_rows=limit,
                                   timeout_s=settings.sql_timeout_s if timeout_s is None else timeout_s)
    emit_rows([dict(zip(result.columns, row, strict=True)) for row in result.rows], result.columns, fmt)
    if result.truncated:
        click.echo(f"showing the first {limit} rows; --max-rows 0 for all", err=True)


@cli.command()
@click.argument("name", required=False)
@format_option
def detectors(name: str | None, fmt: str) -> None:
    """The detectors and their `--set` settings with defaults (all of them, or NAME's)."""
    import dataclasses

    from adqueue.detectors import registry
    from adqueue.jobs.train_settings import TRAIN_KEYS

    rows = []
    for detector in [name] if name else registry.names():
        try:  # the settings modules (detectors/<name>/config.py), not the detectors: no torch to list them
            spec = registry.config_spec(detector)
        except ValueError as exc:
            raise AdqueueError(str(exc)) from None
        defaults = spec.config_class()  # levels left empty are filled in per backbone here
        for item in dataclasses.fields(spec.config_class):
            if item.name in TRAIN_KEYS:
                continue  # set through the training key of the same name
            default = getattr(defaults, item.name)
            if isinstance(default, tuple):
                default = ",".join(str(v) for v in default)
                if item.default == ():
                    default = f"{default} (per backbone)" if default else "per backbone"
            rows.append({"detector": detector, "setting": item.name, "default": default, "about": spec.summary})
    rows += [{"detector": "(training)", "setting": key, "default": value, "about": "any detector"}
             for key, value in TRAIN_KEYS.items()]
    emit_rows(rows, ["detector", "setting", "default"] + (["about"] if fmt != "table" else []), fmt)
