"""`adqueue`: train anomaly detectors, score image dumps, query the results.

Global options set where things live; each verb is one small function in submit.py (train,
score, evaluate), control.py (cancel, resume, reconcile), inspect.py (jobs, results, models,
sql) or admin.py (worker, db, demo).
"""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from adqueue.cli.output import log_to_terminal
from adqueue.core.config import Settings
from adqueue.core.errors import AdqueueError, DatabaseUnreachable, Interrupted, JobStalled

EPILOG = """\b
Without --broker (or ADQUEUE_BROKER_URL) everything runs in this process
on the embedded SQLite database: no Redis, no PostgreSQL needed.
Examples:
  adqueue demo
  adqueue train --detector mvg --data good_images/ --name tiles
  adqueue score --model tiles nightly_dump/
  adqueue results 2 --anomalous --top 20
  adqueue sql "SELECT path, score FROM results WHERE is_anomaly ORDER BY score DESC"
"""


class _Group(click.Group):
    """Turns our errors into one clear line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (JobStalled, DatabaseUnreachable) as exc:  # each with its own documented exit status
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except AdqueueError as exc:
            raise click.ClickException(str(exc)) from None
        except OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise click.ClickException(f"database error: {reason}") from None
        except SQLAlchemyError as exc:
            raise click.ClickException(f"database error: {exc}") from None
        except (KeyboardInterrupt, Interrupted) as exc:
            job_id = getattr(exc, "job_id", None)
            resume = f"; `adqueue resume {job_id}` completes job {job_id}" if job_id else ""
            click.echo(f"stopped by {exc.name if isinstance(exc, Interrupted) else 'Ctrl-C'}{resume}", err=True)
            ctx.exit(128 + exc.signum if isinstance(exc, Interrupted) else 130)


@click.group(cls=_Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", "database_url", metavar="URL", help="Database URL [env ADQUEUE_DATABASE_URL; "
              "default: SQLite file in the data dir]. PostgreSQL: postgresql://user@host/db")
@click.option("--broker", "broker_url", metavar="URL", help="Redis broker URL, e.g. redis://host:6379/0 "
              "[env ADQUEUE_BROKER_URL; default: none = run in this process].")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where models, heat maps and the "
              "SQLite file live [env ADQUEUE_DATA_DIR; default ./adqueue-data].")
@click.option("--queue", help="Celery queue for jobs [env ADQUEUE_QUEUE; default gpu].")
@click.option("-v", "--verbose", is_flag=True, help="Log more (INFO level).")
@click.version_option(package_name="adqueue")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, broker_url: str | None, data_dir: str | None,
        queue: str | None, verbose: bool) -> None:
    """Visual anomaly detection as a batch service: train on defect-free images, score dumps
    through Redis/Celery workers (or in this process), query results with SQL."""
    log_to_terminal(verbose)
    ctx.obj = {"options": {"database_url": database_url, "broker_url": broker_url,
                           "data_dir": data_dir, "queue": queue}}


def settings_from(ctx: click.Context, *, existing: bool = False, **overrides: Any) -> Settings:
    """The settings of this invocation. `existing`: for a verb that only reads or steers jobs, which
    refuses a data dir that does not exist instead of creating it (Settings.require_data_dir)."""
    options = {**ctx.find_root().obj["options"], **{k: v for k, v in overrides.items() if v is not None}}
    settings = Settings.load(**options)
    if existing:
        settings.require_data_dir()
    return settings


from adqueue.cli import admin, control, inspect, serve, submit  # noqa: E402,F401 - registers the verbs
