"""Operating verbs: worker, db, demo."""

from __future__ import annotations

import os

import click

from adqueue.cli import cli, settings_from
from adqueue.cli.output import info, log_everything
from adqueue.core.errors import ConfigError
from adqueue.jobs.context import Context
from adqueue.store.migrate import head_revision, upgrade
from adqueue.store.session import Store


@cli.command()
@click.option("--queues", default=None, help="Comma-separated queues to consume [default: --queue, i.e. gpu].")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Processes. 1 = one solo process (one per GPU); >1 = a prefork pool (CPU hosts).")
@click.option("--device", default=None, help="auto (CUDA if present), cpu, cuda or cuda:N [env ADQUEUE_DEVICE].")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), envvar="ADQUEUE_METRICS_PORT", default=None,
              metavar="PORT", help="Serve Prometheus metrics on http://0.0.0.0:PORT/metrics (images scored and "
              "failed, batch and shard durations, leases lost, reconciler actions, queue depth); needs "
              "--concurrency 1 [env ADQUEUE_METRICS_PORT].")
@click.pass_context
def worker(ctx: click.Context, queues: str | None, concurrency: int, device: str | None, loglevel: str,
           metrics_port: int | None) -> None:
    """Run a Celery worker that trains and scores jobs from Redis.

    Each worker also runs the reconciler every ADQUEUE_RECONCILE_INTERVAL seconds: it takes back
    work whose lease expired, re-sends messages the broker lost and ends finished jobs."""
    settings = settings_from(ctx, device=device)
    if settings.embedded:
        raise ConfigError("a worker needs a broker: pass --broker redis://HOST:6379/0 or set ADQUEUE_BROKER_URL")
    if metrics_port is not None and concurrency != 1:
        raise ConfigError("--metrics-port needs --concurrency 1: one solo worker per port (one per GPU, or "
                          "several on a CPU host, each with its own port)")
    Context(settings).store  # noqa: B018 - fail now, clearly, if the database is unreachable
    log_everything()  # a worker's log is the record of its jobs: training's warnings included
    # Children (prefork) and the lazily built runtime read the same settings from the environment.
    os.environ.update(settings.export_env())
    os.environ["ADQUEUE_WORKER_CONCURRENCY"] = str(concurrency)
    os.environ["ADQUEUE_WORKER_QUEUES"] = queues or settings.queue
    os.environ["ADQUEUE_METRICS_PORT"] = str(metrics_port or "")
    # Imported for their signal handlers: the metrics endpoint (with a port) and the periodic reconciler.
    import adqueue.workers.metrics
    import adqueue.workers.reconciler  # noqa: F401
    from adqueue.workers.app import make_app, run_worker
    from adqueue.workers.producer import check_broker

    check_broker(settings.broker_url or "")
    app = make_app(settings)
    argv = [
        "worker",
        f"--queues={queues or settings.queue}",
        f"--concurrency={concurrency}",
        f"--pool={'solo' if concurrency == 1 else 'prefork'}",
        f"--hostname=adqueue-{os.getpid()}@%h",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    status = run_worker(app, argv)
    if status:  # an unrecoverable error: non-zero, so a supervisor (docker compose) restarts it
        ctx.exit(status)


@cli.group()
def db() -> None:
    """Database schema management."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or upgrade the schema to the latest revision (other verbs do this on first use too),
    then build the summary of every job that has none (written by an older version, or rows loaded
    in bulk): the pages read summaries, never a night's rows."""
    from adqueue.jobs.reconcile import build_missing_summaries

    settings = settings_from(ctx)
    store = Store(settings.database_url)
    store.check_reachable()
    changed = upgrade(store)
    info(f"{store.safe_url}: {'upgraded to' if changed else 'already at'} revision {head_revision()}")
    built = build_missing_summaries(store)
    if built:
        info(f"summaries built for {built} job(s) from their result rows")


@cli.command()
@click.option("--normal", default=60, show_default=True, type=click.IntRange(20, 2000),
              help="Defect-free training images to generate.")
@click.option("--dump", default=40, show_default=True, type=click.IntRange(4, 2000),
              help="Images in the dump to score (about half with defects).")
@click.option("--device", default=None, help="auto, cpu or cuda.")
@click.pass_context
def demo(ctx: click.Context, normal: int, dump: int, device: str | None) -> None:
    """End to end on real textures: build a dataset with synthetic defects, train `mvg`, score a
    dump, evaluate, and print the top anomalies from SQL with their heat maps."""
    from adqueue.cli.demo import run_demo

    run_demo(settings_from(ctx, device=device), n_normal=normal, n_dump=dump)
