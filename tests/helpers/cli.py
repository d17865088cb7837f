"""`adqueue` in the test process itself (click's runner) on the embedded default."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result


def invoke_cli(data_dir: Path, *args: str, ok: bool = True, **env: str) -> Result:
    """`adqueue --data-dir DATA_DIR ARGS` in this process on the embedded default (no broker)."""
    from adqueue.cli import cli

    result = CliRunner().invoke(cli, ["--data-dir", str(data_dir), *args], env={"ADQUEUE_BROKER_URL": "", **env},
                                catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result
