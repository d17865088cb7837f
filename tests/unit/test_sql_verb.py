"""`adqueue sql` on SQLite: a real tokenizer, a row cap, a time limit, a read-only file, its own URL."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy.exc import DBAPIError

from adqueue.cli import cli
from adqueue.core.errors import AdqueueError, ReadOnlyViolation
from adqueue.store import read_only_sql as queries
from adqueue.store.session import make_engine
from tests.helpers.cli import invoke_cli

# Counts 1, 2, 3, ... for ever: only a row cap or a time limit ends it.
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT {} FROM c"
UP_TO = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {}) SELECT x FROM c"
# Blank is unset: the caller's ADQUEUE_* variables must not change what these tests see.
CLEAN_ENV = {"ADQUEUE_BROKER_URL": "", "ADQUEUE_DATABASE_URL": "", "ADQUEUE_SQL_DATABASE_URL": "",
             "ADQUEUE_SQL_MAX_ROWS": "", "ADQUEUE_SQL_TIMEOUT": ""}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sql")


def sql(data_dir: Path, *args: str, ok: bool = True, **env: str) -> Result:
    return invoke_cli(data_dir, "sql", *args, ok=ok, **{**CLEAN_ENV, **env})


def rows_of(result: Result) -> list[dict]:
    return json.loads(result.stdout)


def assert_one_clear_line(result: Result, text: str) -> None:
    assert result.exit_code != 0
    assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("pattern", "expected"), [("%--%", "a--b"), ("%;%", "a;b"), ("%/*%", "a/*b")])
def test_comment_marks_and_semicolons_inside_literals_are_data(data_dir: Path, pattern: str, expected: str) -> None:
    statement = ("/* leading comment */ SELECT column1 AS v FROM (VALUES ('a--b'), ('a;b'), ('a/*b'), ('plain')) "
                 f"WHERE column1 LIKE '{pattern}' -- trailing comment\n;")
    assert rows_of(sql(data_dir, statement, "--format", "json")) == [{"v": expected}]


@pytest.mark.parametrize("statement", [
    "SELECT 1; SELECT 2",
    "SELECT ';'; SELECT 2",
    "SELECT 1; DELETE FROM jobs",
    "SELECT 1 FROM jobs BEGIN x; SELECT 2 END",  # one "statement" to sqlparse's splitter
])
def test_two_statements_are_refused(data_dir: Path, statement: str) -> None:
    assert_one_clear_line(sql(data_dir, statement, ok=False), "runs one statement at a time")


def test_an_endless_query_stops_at_the_row_cap_with_a_note(data_dir: Path) -> None:
    # fetchall() would never return here: only fetching up to the cap ends the query.
    result = sql(data_dir, ENDLESS.format("x"), "--max-rows", "5", "--timeout", "30", "--format", "json")
    assert rows_of(result) == [{"x": n} for n in range(1, 6)]
    assert result.stderr.strip() == "showing the first 5 rows; --max-rows 0 for all"


def test_the_default_cap_is_10000_rows_and_0_means_all(data_dir: Path) -> None:
    capped = sql(data_dir, UP_TO.format(12_345), "--format", "json")
    assert len(rows_of(capped)) == 10_000
    assert capped.stderr.strip() == "showing the first 10000 rows; --max-rows 0 for all"
    everything = sql(data_dir, UP_TO.format(12_345), "--max-rows", "0", "--format", "json")
    assert len(rows_of(everything)) == 12_345 and everything.stderr.strip() == ""
    from_env = sql(data_dir, UP_TO.format(100), "--format", "json", ADQUEUE_SQL_MAX_ROWS="7")
    assert len(rows_of(from_env)) == 7 and "showing the first 7 rows" in from_env.stderr
    exact = sql(data_dir, UP_TO.format(7), "--format", "json", ADQUEUE_SQL_MAX_ROWS="7")
    assert len(rows_of(exact)) == 7 and exact.stderr.strip() == ""  # nothing was cut


@pytest.mark.parametrize(("args", "env"), [(["--timeout", "1"], {}), ([], {"ADQUEUE_SQL_TIMEOUT": "1"})])
def test_a_query_past_its_time_limit_stops_with_one_line(data_dir: Path, args: list[str], env: dict) -> None:
    started = time.monotonic()
    result = sql(data_dir, ENDLESS.format("count(*)"), *args, ok=False, **env)
    assert time.monotonic() - started < 8
    assert_one_clear_line(result, "adqueue sql: the query ran past its 1 s limit (--timeout)")


@pytest.mark.parametrize("statement", [
    "DELETE FROM jobs",
    "UPDATE jobs SET status = 'done'",
    "WITH gone AS (DELETE FROM jobs RETURNING id) SELECT * FROM gone",
    "WITH x AS (SELECT 1) DELETE FROM jobs",
    "EXPLAIN DELETE FROM jobs",
    "SELECT id FROM jobs FOR UPDATE",
    "SELECT 1 AS x INTO sneaky",
    "CREATE TABLE sneaky (x int)",
    "ATTACH DATABASE ':memory:' AS other",
    "PRAGMA query_only = OFF",
    "-- a comment first\nINSERT INTO jobs (kind) VALUES ('score')",
])
def test_writes_are_refused(data_dir: Path, statement: str) -> None:
    before = sql(data_dir, "SELECT count(*) AS n FROM jobs", "--format", "json").stdout
    # "--": a statement that starts with a comment is not an option.
    assert_one_clear_line(sql(data_dir, "--", statement, ok=False), "read-only")
    assert sql(data_dir, "SELECT count(*) AS n FROM jobs", "--format", "json").stdout == before


@pytest.mark.parametrize(("statement", "body"), [
    ("SELECT 1;", "SELECT 1"),
    ("  SELECT 1 ; -- bye\n ;", "SELECT 1"),
    ("/* hi */ SELECT ';' AS s", "/* hi */ SELECT ';' AS s"),
    ("SELECT $$;--$$, E'it\\'s; DELETE'", "SELECT $$;--$$, E'it\\'s; DELETE'"),
    ("(SELECT 1) UNION (SELECT 2)", "(SELECT 1) UNION (SELECT 2)"),
    ("VALUES (1), (2)", "VALUES (1), (2)"),
    ("TABLE jobs", "TABLE jobs"),
    ("SHOW statement_timeout", "SHOW statement_timeout"),
    ("EXPLAIN SELECT * FROM jobs", "EXPLAIN SELECT * FROM jobs"),
    ("SELECT replace (path, 'a', 'b') FROM results", "SELECT replace (path, 'a', 'b') FROM results"),
    ("SELECT 'set_config(1)', \"delete\" FROM t", "SELECT 'set_config(1)', \"delete\" FROM t"),
])
def test_check_read_only_accepts_one_read(statement: str, body: str) -> None:
    assert queries.check_read_only(statement) == body


@pytest.mark.parametrize(("statement", "message"), [
    ("", "empty SQL statement"),
    ("-- nothing\n;", "empty SQL statement"),
    ("SELECT set_config('role', 'postgres', false)", "set_config() is refused"),
    ("SELECT pg_catalog.set_config('statement_timeout', '0', false)", "set_config() is refused"),
    ('SELECT "set_config" /* hidden */ (\'role\', \'postgres\', false)', "set_config() is refused"),
    ("SELECT * FROM set_config('role', 'postgres', false)", "set_config() is refused"),
    ("SELECT query_to_xml('DELETE FROM jobs', true, true, '')", "query_to_xml() is refused"),
    ("SELECT * FROM dblink_exec('dbname=adqueue', 'DELETE FROM jobs')", "dblink_exec() is refused"),
    ('SELECT U&"set\\005fconfig"(\'role\', \'postgres\', false)', 'U&"..." names are refused'),
    ("COPY jobs TO PROGRAM 'sh'", "COPY statements are refused"),
    ("SET ROLE postgres", "SET statements are refused"),
])
def test_check_read_only_refuses(statement: str, message: str) -> None:
    with pytest.raises(ReadOnlyViolation, match=r"read-only|empty") as refused:
        queries.check_read_only(statement)
    assert message in str(refused.value)


def test_the_database_refuses_what_the_check_misses(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{data_dir / 'adqueue.db'}"
    sql(data_dir, "SELECT 1")  # the schema exists
    # As if the tokenizer were fooled: every statement reaches the database unchecked.
    monkeypatch.setattr(queries, "_read_statement", lambda statement: (statement, "SELECT"))
    with pytest.raises(ReadOnlyViolation, match="read-only: attempt to write a readonly database"):
        queries.run_read_only(url, "DELETE FROM jobs")
    with pytest.raises(AdqueueError, match="one statement at a time"):  # sqlite3 itself
        queries.run_read_only(url, "SELECT 1; DELETE FROM jobs")
    # The file is opened read-only: even with query_only switched off, SQLite cannot write.
    engine = make_engine(url, read_only=True)
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA query_only = OFF")
        with pytest.raises(DBAPIError, match="readonly database"):
            connection.exec_driver_sql("CREATE TABLE sneaky (x int)")
    engine.dispose()
    assert "sneaky" not in sqlite3.connect(data_dir / "adqueue.db").execute(
        "SELECT group_concat(name) FROM sqlite_master").fetchone()[0]


def test_sql_database_url_is_used_instead_of_the_main_one(tmp_path: Path) -> None:
    other = tmp_path / "reports.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE reports (v text)")
        connection.execute("INSERT INTO reports VALUES ('kept')")
    data_dir = tmp_path / "data"
    env = {"ADQUEUE_SQL_DATABASE_URL": f"sqlite:///{other}"}
    assert rows_of(sql(data_dir, "SELECT v FROM reports", "--format", "json", **env)) == [{"v": "kept"}]
    assert_one_clear_line(sql(data_dir, "DELETE FROM reports", ok=False, **env), "read-only")
    assert rows_of(sql(data_dir, "SELECT v FROM reports", "--format", "json", **env)) == [{"v": "kept"}]
    assert not (data_dir / "adqueue.db").exists()  # the main database was not even opened
    bad = sql(data_dir, "SELECT 1", ok=False, ADQUEUE_SQL_DATABASE_URL="mysql://x/y")
    assert_one_clear_line(bad, "unsupported ADQUEUE_SQL_DATABASE_URL")


def test_help_explains_the_caps_the_timeout_and_the_url() -> None:
    text = CliRunner().invoke(cli, ["sql", "--help"]).output
    for words in ("--max-rows N", "0: all rows", "ADQUEUE_SQL_MAX_ROWS", "default 10000", "--timeout SECONDS",
                  "ADQUEUE_SQL_TIMEOUT", "default", "ADQUEUE_SQL_DATABASE_URL", "read-only"):
        assert words in text, words


def test_help_lists_every_table() -> None:
    from adqueue.store.models import Base

    text = " ".join(CliRunner().invoke(cli, ["sql", "--help"]).output.split())
    (listed,) = [line for line in text.split(". ") if line.startswith("Tables: ")]
    assert sorted(listed.removeprefix("Tables: ").split(" (")[0].split(", ")) == sorted(Base.metadata.tables)


@pytest.mark.parametrize("statement", ["selec * from jobs", "jobs", "42"])
def test_a_typo_is_no_statement_rather_than_a_write(data_dir: Path, statement: str) -> None:
    word = statement.split()[0]
    assert_one_clear_line(sql(data_dir, statement, ok=False),
                          f"Error: adqueue sql knows no statement that starts with {word!r} (a typo?): it runs one "
                          "read statement, starting with one of EXPLAIN, SELECT, SHOW, TABLE, VALUES, WITH")
    assert "read-only" not in sql(data_dir, statement, ok=False).stderr
