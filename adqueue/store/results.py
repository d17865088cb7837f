"""The results table's one write: a whole shard's rows in one statement.

On PostgreSQL the rows travel by COPY into a temporary staging table, then one INSERT ... SELECT
... ON CONFLICT moves them: an executemany upsert costs a round trip's worth of protocol per row
(~9,000 rows/s per process here), COPY a few per shard. SQLite, in-process, takes executemany.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from adqueue.store.models import Result

# Columns an upsert refreshes when a (job_id, path) row already exists.
_RESULT_UPDATE_COLUMNS = (
    "model_id", "shard_id", "sha256", "score", "is_anomaly", "heatmap_path", "error",
    "width", "height", "label", "defect", "scores", "scored_at", "run_id", "file_size", "file_mtime_ns",
)
_COLUMNS = ("job_id", "path", *_RESULT_UPDATE_COLUMNS)
_STAGE = "adqueue_results_stage"
# Created once per connection and session (temporary), emptied at each commit.
_CREATE_STAGE = (f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} ON COMMIT DELETE ROWS AS "
                 f"SELECT {', '.join(_COLUMNS)} FROM results WITH NO DATA")
_MOVE = (f"INSERT INTO results ({', '.join(_COLUMNS)}) SELECT {', '.join(_COLUMNS)} FROM {_STAGE} "
         f"ON CONFLICT (job_id, path) DO UPDATE SET "
         + ", ".join(f"{column} = EXCLUDED.{column}" for column in _RESULT_UPDATE_COLUMNS)
         + f"; DELETE FROM {_STAGE}")


def upsert_results(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """One bulk INSERT ... ON CONFLICT (job_id, path) DO UPDATE for a whole shard."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        _copy_upsert(session, rows)
    elif dialect == "sqlite":
        lite = sqlite.insert(Result)
        statement = lite.on_conflict_do_update(
            index_elements=[Result.job_id, Result.path],
            set_={column: lite.excluded[column] for column in _RESULT_UPDATE_COLUMNS})
        session.execute(statement, list(rows))
    else:  # pragma: no cover - guarded by Settings.validate
        raise RuntimeError(f"unsupported dialect {dialect}")


def _copy_upsert(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    from psycopg.types.json import Json

    from adqueue.core.clock import utcnow

    now = utcnow()
    connection = session.connection().connection.driver_connection  # this transaction's own connection
    assert connection is not None
    with connection.cursor() as cursor:
        cursor.execute(_CREATE_STAGE)
        with cursor.copy(f"COPY {_STAGE} ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                scores = row.get("scores")
                copy.write_row((
                    row["job_id"], row["path"], row.get("model_id"), row.get("shard_id"), row.get("sha256"),
                    row.get("score"), row.get("is_anomaly"), row.get("heatmap_path"), row.get("error"),
                    row.get("width"), row.get("height"), row.get("label"), row.get("defect"),
                    None if scores is None else Json(scores), row.get("scored_at") or now, row.get("run_id"),
                    row.get("file_size"), row.get("file_mtime_ns")))
        cursor.execute(_MOVE)
