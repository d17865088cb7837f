"""The store on a real PostgreSQL: migration parity, concurrent upgrades, read-only SQL."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import DBAPIError

from adqueue.errors import ReadOnlyViolation
from adqueue.store.migrate import ensure_schema, head_revision
from adqueue.store.models import Base
from adqueue.store.queries import run_read_only
from adqueue.store.session import Store, make_engine
from tests.servers import create_database

pytestmark = pytest.mark.integration


@pytest.fixture
def database(postgres_url: str) -> str:
    return create_database(postgres_url, f"adq_{uuid.uuid4().hex[:10]}")


def test_concurrent_first_use_migrates_once_and_matches_the_orm(database: str) -> None:
    stores = [Store(database) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        changed = list(pool.map(ensure_schema, stores))
    assert changed.count(True) == 1  # the advisory lock let exactly one caller upgrade
    with stores[0].engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []


def test_read_only_sql_is_enforced_by_postgres_itself(database: str) -> None:
    ensure_schema(Store(database))
    # A data-modifying CTE starts with WITH, so only the database can refuse it.
    with pytest.raises(ReadOnlyViolation, match="read-only"):
        run_read_only(database, "WITH gone AS (DELETE FROM jobs RETURNING id) SELECT * FROM gone")
    engine = make_engine(database, read_only=True)
    with engine.connect() as connection, pytest.raises(DBAPIError, match="read-only transaction"):
        connection.exec_driver_sql("CREATE TABLE sneaky (x int)")
    engine.dispose()
    columns, rows = run_read_only(database, "SELECT count(*) AS n FROM jobs")
    assert columns == ["n"] and rows == [(0,)]
