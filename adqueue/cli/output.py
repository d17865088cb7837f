"""Printing data: a table for people, JSON or CSV for scripts. Messages go to stderr.

rich is imported when something is printed with it (a table, a message), not when the CLI is
loaded: `--help` and JSON output do without it.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any

import click

from adqueue.core.logs import is_outcome

if TYPE_CHECKING:
    from rich.console import Console

FORMATS = ("table", "json", "csv")
format_option = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
    help="table for people; json or csv for scripts.",
)


@cache
def stderr_console() -> Console:
    """The one console for messages and progress bars, on stderr."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _plain(value: Any, *, for_people: bool = False) -> Any:
    # Seconds for eyes; scripts get the microseconds stored, or a job's duration taken from its
    # timestamps would be off by up to a second (a 5 s benchmark run by 20%).
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds" if for_people else "auto")
    if isinstance(value, float):
        return round(value, 6)
    return value


def emit_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str, *, title: str | None = None) -> None:
    if fmt == "json":
        click.echo(json.dumps([{c: _plain(row.get(c)) for c in columns} for row in rows], indent=2))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else _plain(row.get(c)) for c in columns])
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, show_edge=False, header_style="bold")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:  # Text(): values such as "image_auroc[crack]" are data, not markup
            table.add_row(*(Text("" if row.get(c) is None else str(_plain(row.get(c), for_people=True))) for c in columns))
        Console(highlight=False, width=max(Console().width, 160)).print(table)


def emit_object(obj: dict[str, Any], fmt: str, *, title: str | None = None) -> None:
    if fmt == "json":
        click.echo(json.dumps({k: _plain(v) for k, v in obj.items()}, indent=2))
    elif fmt == "csv":
        emit_rows([obj], list(obj), "csv")
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, show_header=False, show_edge=False)
        table.add_column("key", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in obj.items():
            table.add_row(Text(key), Text("" if value is None else str(_plain(value, for_people=True))))
        Console(highlight=False).print(table)


def info(message: str) -> None:
    stderr_console().print(message)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ConsoleLog(logging.Handler):
    """Log records on the terminal through the console the progress bars draw on, so that a line
    prints above the bars rather than across them: "warning: ..." (with -v, timestamped and named).
    Records that repeat a job's outcome (core/logs.py) are left out: the verb prints the outcome
    from SQL once the job has ended."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT) if verbose else _Plain())
        self.addFilter(lambda record: not is_outcome(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from rich.text import Text

            stderr_console().print(Text(self.format(record)))
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


class _Plain(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def log_to_terminal(verbose: bool) -> None:
    """The CLI's logging: ConsoleLog on the root logger, replacing one an earlier call installed."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ConsoleLog)]:
        root.removeHandler(handler)
    root.addHandler(ConsoleLog(verbose))
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def log_everything() -> None:
    """A worker's logging: every record, outcomes included, timestamped on stderr (Celery keeps
    the root logger's handler: worker_hijack_root_logger is off)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ConsoleLog)]:
        root.removeHandler(handler)
    logging.basicConfig(format=LOG_FORMAT, stream=sys.stderr, level=root.level)
