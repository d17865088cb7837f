"""The `adqueue` command's entry point: tune malloc first where it pays, import the CLI after.

The one-time re-exec (malloc_tuning.py) must happen before the heavy imports, or every command
that computes would pay for importing torch twice; commands that only read SQL or submit to a
broker are not re-executed at all, and import no torch (the CLI imports it where a job runs).
"""

from __future__ import annotations


def main() -> None:
    from adqueue.core.malloc_tuning import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()
    from adqueue.cli import cli

    cli(prog_name="adqueue")
