"""The store on a real PostgreSQL: migration parity, concurrent upgrades, read-only SQL (the test
server's URL logs in as the superuser `postgres`, the worst case for `adqueue sql`)."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from adqueue.cli import cli
from adqueue.core.errors import AdqueueError, ReadOnlyViolation
from adqueue.store import read_only_sql as queries
from adqueue.store.migrate import ensure_schema, head_revision
from adqueue.store.models import Base
from adqueue.store.read_only_sql import run_read_only
from adqueue.store.session import Store, make_engine
from benchmarks.harness.servers import create_database

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


def test_read_only_sql_drops_the_superuser_powers(database: str) -> None:
    ensure_schema(Store(database))
    engine = make_engine(database)  # the same login, not read-only: these calls work
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT pg_read_file('/etc/hostname')").scalar()
    engine.dispose()
    with pytest.raises(AdqueueError, match="permission denied for function pg_read_file"):
        run_read_only(database, "SELECT pg_read_file('/etc/hostname')")
    with pytest.raises(AdqueueError, match=r"superuser|permission denied"):
        run_read_only(database, "SELECT pg_terminate_backend(pg_backend_pid())")
    with pytest.raises(AdqueueError, match="permission denied"):
        run_read_only(database, "SELECT * FROM pg_ls_dir('.')")
    # set_config('role', ...) would take the session back to postgres: the check refuses it.
    with pytest.raises(ReadOnlyViolation, match="set_config"):
        run_read_only(database, "SELECT set_config('role', 'postgres', false), pg_read_file('/etc/hostname')")
    assert run_read_only(database, "SELECT current_user, session_user").rows == [("pg_read_all_data", "postgres")]
    assert run_read_only(database, "SELECT count(*) AS n FROM jobs").rows == [(0,)]


def test_read_only_sql_stops_at_its_timeout_and_its_row_cap(database: str) -> None:
    started = time.monotonic()
    with pytest.raises(AdqueueError, match=r"^adqueue sql: the query ran past its 1 s limit \(--timeout\)$"):
        run_read_only(database, "SELECT pg_sleep(5)", timeout_s=1)
    assert time.monotonic() - started < 4
    assert run_read_only(database, "SHOW statement_timeout", timeout_s=7).rows == [("7s",)]
    # Endless: a client-side cursor would wait for all rows until the timeout; a server-side one
    # fetches just past the cap.
    started = time.monotonic()
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c"
    result = run_read_only(database, endless, max_rows=5, timeout_s=20)
    assert result.rows == [(n,) for n in range(1, 6)] and result.truncated
    assert time.monotonic() - started < 10
    assert not run_read_only(database, "VALUES (1), (2)", max_rows=2).truncated
    assert run_read_only(database, "EXPLAIN SELECT 1").rows  # EXPLAIN cannot be a cursor: run plainly


def test_postgres_refuses_what_the_check_misses(database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_schema(Store(database))
    for verb in ("SELECT", "EXPLAIN"):  # a server-side cursor, and a plain prepared statement
        # As if the tokenizer were fooled: the statement reaches PostgreSQL unchecked.
        monkeypatch.setattr(queries, "_read_statement", lambda statement, verb=verb: (statement, verb))
        with pytest.raises(AdqueueError, match="cannot insert multiple commands"):
            run_read_only(database, "SELECT 1; SELECT pg_read_file('/etc/hostname')")
        with pytest.raises(ReadOnlyViolation, match="read-only"):
            run_read_only(database, "WITH gone AS (DELETE FROM jobs RETURNING id) SELECT * FROM gone")


def test_adqueue_sql_uses_its_own_database_url(database: str, tmp_path: Path) -> None:
    ensure_schema(Store(database))
    url = make_url(database)
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host=url.host, port=url.port, user="postgres", dbname=url.database, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT CONNECT ON DATABASE "{url.database}" TO "{role}"')
        admin.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
    reader = url.set(username=role).render_as_string(hide_password=False)
    env = {"ADQUEUE_BROKER_URL": "", "ADQUEUE_DATABASE_URL": database, "ADQUEUE_SQL_DATABASE_URL": reader,
           "ADQUEUE_SQL_MAX_ROWS": "", "ADQUEUE_SQL_TIMEOUT": ""}

    def sql(*args: str):
        return CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "sql", *args], env=env, catch_exceptions=False)

    read = sql("SELECT current_user AS who, count(*) AS n FROM jobs", "--format", "json")
    assert read.exit_code == 0, read.stderr
    assert json.loads(read.stdout) == [{"who": role, "n": 0}]
    refused = sql("DELETE FROM jobs")
    assert refused.exit_code != 0 and "read-only" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    # Below the verb: the reader's session is read-only, and the role itself may not write.
    engine = make_engine(reader, read_only=True)
    with engine.connect() as connection, pytest.raises(DBAPIError, match="read-only transaction"):
        connection.exec_driver_sql("DELETE FROM jobs")
    engine.dispose()
    engine = make_engine(reader)
    with engine.connect() as connection, pytest.raises(DBAPIError, match="permission denied"):
        connection.exec_driver_sql("DELETE FROM jobs")
    engine.dispose()
