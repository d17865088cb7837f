"""The results table's one write: a whole shard's rows in one statement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from adqueue.store.models import Result

# Columns an upsert refreshes when a (job_id, path) row already exists.
_RESULT_UPDATE_COLUMNS = (
    "model_id", "shard_id", "sha256", "score", "is_anomaly", "heatmap_path", "error",
    "width", "height", "label", "defect", "scores", "scored_at", "run_id", "file_size", "file_mtime_ns",
)


def upsert_results(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """One bulk INSERT ... ON CONFLICT (job_id, path) DO UPDATE for a whole shard."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        pg = postgresql.insert(Result)
        statement: Any = pg.on_conflict_do_update(
            index_elements=[Result.job_id, Result.path],
            set_={column: pg.excluded[column] for column in _RESULT_UPDATE_COLUMNS})
    elif dialect == "sqlite":
        lite = sqlite.insert(Result)
        statement = lite.on_conflict_do_update(
            index_elements=[Result.job_id, Result.path],
            set_={column: lite.excluded[column] for column in _RESULT_UPDATE_COLUMNS})
    else:  # pragma: no cover - guarded by Settings.validate
        raise RuntimeError(f"unsupported dialect {dialect}")
    session.execute(statement, list(rows))
