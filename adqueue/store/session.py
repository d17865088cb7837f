"""Engines and sessions for SQLite (the embedded default) and PostgreSQL (many hosts).

SQLite runs in WAL mode with a busy timeout so several worker processes on one host can share a
file. Write transactions start with BEGIN IMMEDIATE: a deferred transaction that reads and then
writes can fail at once with SQLITE_BUSY instead of waiting, which is exactly the pattern of a
shard commit.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from adqueue.core.errors import ConfigError

log = logging.getLogger(__name__)
SQLITE_BUSY_TIMEOUT_MS = 60_000
SQLITE_PROGRESS_OPS = 1_000  # a deadline check per 1,000 VM steps: well under 1 ms apart, ~free
T = TypeVar("T")


def normalize_url(url: str) -> str:
    """Accept plain postgresql:// URLs and pick psycopg 3, the driver we ship."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    database = parsed.database
    if not database or database == ":memory:":
        return None
    if database.startswith("file:") and parsed.query.get("uri") == "true":  # config.sqlite_url's form
        return Path(unquote(database[len("file:"):].split("?", 1)[0]))
    return Path(database)


def make_engine(url: str, *, read_only: bool = False, timeout_s: float | None = None) -> Engine:
    """An engine for `url`. read_only: the database itself refuses writes (and, on PostgreSQL,
    superuser-only functions where it can); timeout_s (read-only engines): each statement is
    stopped after this many seconds."""
    url = normalize_url(url)
    if is_sqlite(url):
        return _sqlite_engine(url, read_only=read_only, timeout_s=timeout_s)
    try:
        engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except ModuleNotFoundError as exc:
        raise ConfigError(f"no driver for {url!r}: {exc}") from exc
    if read_only:

        @event.listens_for(engine, "connect")
        def _pg_read_only(dbapi_connection: Any, _record: Any) -> None:
            _pg_read_only_session(dbapi_connection, timeout_s)

    return engine


def _pg_read_only_session(dbapi_connection: Any, timeout_s: float | None) -> None:
    """Session settings of a read-only PostgreSQL connection: READ ONLY transactions, a statement
    timeout, and the pg_read_all_data role where this login may take it."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        if timeout_s:
            cursor.execute(f"SET statement_timeout = {max(1, round(timeout_s * 1000))}")
    dbapi_connection.commit()
    _pg_drop_to_reader(dbapi_connection)


def _pg_drop_to_reader(dbapi_connection: Any) -> None:
    """SET ROLE pg_read_all_data (PostgreSQL 14+) when the login is a superuser or a member: READ
    ONLY stops writes but not what a superuser may do otherwise (pg_read_file, COPY TO PROGRAM,
    pg_terminate_backend of any session). Without that role the session stays as it was."""
    with dbapi_connection.cursor() as cursor:
        # pg_has_role() fails on a role name that does not exist (before 14): ask by oid.
        cursor.execute("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pg_read_all_data' "
                       "AND pg_has_role(current_user, oid, 'MEMBER'))")
        member = cursor.fetchone()[0]
    dbapi_connection.commit()
    if not member:
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET ROLE pg_read_all_data")
        dbapi_connection.commit()
    except Exception as exc:  # noqa: BLE001 - e.g. PostgreSQL 16 membership without the SET option
        dbapi_connection.rollback()
        log.debug("read-only session keeps its login role: %s", exc)


def _switch_to_wal(cursor: sqlite3.Cursor, busy_ms: int) -> None:
    """PRAGMA journal_mode=WAL, tried again for up to `busy_ms` while the file is locked.

    Switching a new database file to WAL needs it to itself, and SQLite answers "database is
    locked" at once, without waiting in its busy handler, while another process is creating or
    switching the same file: two workers started together on a new data dir then lost one of them
    (tests/unit/test_store.py makes that race happen). Only a database's first moments see it: WAL
    mode is stored in the file.
    """
    deadline = time.monotonic() + busy_ms / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _sqlite_engine(url: str, *, read_only: bool, timeout_s: float | None = None) -> Engine:
    path = _sqlite_file(url)
    if path is not None and not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    busy_ms = SQLITE_BUSY_TIMEOUT_MS
    if read_only and timeout_s:
        busy_ms = min(busy_ms, max(1, round(timeout_s * 1000)))  # waiting on a lock counts too
    read_only_file = _sqlite_read_only_file(path, read_only, busy_ms)
    engine = create_engine(url, connect_args={"timeout": busy_ms / 1000}, **read_only_file)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event, not the sqlite3 module, decide when transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not read_only:
            _switch_to_wal(cursor, busy_ms)
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        if read_only and timeout_s:
            _sqlite_deadline(connection.connection.driver_connection, timeout_s)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def _sqlite_read_only_file(path: Path | None, read_only: bool, busy_ms: int) -> dict[str, Any]:
    """create_engine arguments that open an existing file read-only (mode=ro): a write then
    fails in SQLite's pager, whatever PRAGMA a statement manages to change. A file that does not
    exist yet (or :memory:) opens as before, with PRAGMA query_only alone."""
    if not read_only or path is None or not path.is_file():
        return {}
    uri = path.resolve().as_uri() + "?mode=ro"
    return {"creator": lambda: sqlite3.connect(uri, uri=True, timeout=busy_ms / 1000, check_same_thread=False)}


def _sqlite_deadline(dbapi_connection: sqlite3.Connection, timeout_s: float) -> None:
    """Abort the transaction's statements after `timeout_s`: SQLite has no statement timeout, but
    it calls a progress handler every SQLITE_PROGRESS_OPS virtual-machine steps, and a true
    return interrupts the statement ("interrupted")."""
    deadline = time.monotonic() + timeout_s
    dbapi_connection.set_progress_handler(lambda: time.monotonic() > deadline, SQLITE_PROGRESS_OPS)


class Store:
    """The database of one deployment: an engine and a session factory."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    def transaction(self, work: Callable[[Session], T], *, retry_s: float = 0.0) -> T:
        """`work` in one transaction, tried again for up to `retry_s` seconds while the database
        is unreachable (a PostgreSQL restart, say). Only for guarded, idempotent work: a retry
        after a commit whose reply was lost finds its guard already taken and changes nothing."""
        deadline = time.monotonic() + retry_s
        delay = 0.5
        while True:
            try:
                with self.session() as session:
                    return work(session)
            except (OperationalError, InterfaceError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                reason = (str(exc.orig or exc).strip().splitlines() or [""])[0][:200]
                log.warning("database unavailable (%s); retrying in %.1f s", reason, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def dispose(self) -> None:
        """Drop pooled connections (after a fork, a child must not reuse its parent's sockets)."""
        self.engine.dispose(close=False)

    def check_reachable(self) -> None:
        try:
            with self.engine.connect():
                pass
        except OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise ConfigError(f"cannot open the database {self.safe_url}: {reason}") from exc

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)
