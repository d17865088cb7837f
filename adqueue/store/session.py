"""Engines and sessions for SQLite (the embedded default) and PostgreSQL (many hosts).

SQLite runs in WAL mode with a busy timeout so several worker processes on one host can share a
file. Write transactions start with BEGIN IMMEDIATE: a deferred transaction that reads and then
writes can fail at once with SQLITE_BUSY instead of waiting, which is exactly the pattern of a
shard commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from adqueue.errors import ConfigError

log = logging.getLogger(__name__)
SQLITE_BUSY_TIMEOUT_MS = 60_000
T = TypeVar("T")


def normalize_url(url: str) -> str:
    """Accept plain postgresql:// URLs and pick psycopg 3, the driver we ship."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_file(url: str) -> Path | None:
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    url = normalize_url(url)
    if is_sqlite(url):
        return _sqlite_engine(url, read_only=read_only)
    try:
        engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except ModuleNotFoundError as exc:
        raise ConfigError(f"no driver for {url!r}: {exc}") from exc
    if read_only:

        @event.listens_for(engine, "connect")
        def _pg_read_only(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            dbapi_connection.commit()

    return engine


def _sqlite_engine(url: str, *, read_only: bool) -> Engine:
    path = _sqlite_file(url)
    if path is not None and not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's "begin" event, not the sqlite3 module, decide when transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not read_only:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


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
