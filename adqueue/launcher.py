"""The `adqueue` command's entry point: tune malloc first, import the CLI (torch and all) after.

The one-time re-exec (malloc_tuning.py) must happen before the heavy imports, or every command
would pay for importing torch twice.
"""

from __future__ import annotations


def main() -> None:
    from adqueue.malloc_tuning import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()
    from adqueue.cli import cli

    cli(prog_name="adqueue")
