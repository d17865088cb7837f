"""Bring a database to the schema this code expects, safely from several processes at once.

Every verb calls `ensure_schema`: a fresh SQLite file or an empty PostgreSQL database is set up on
first use. Concurrent callers serialize on a lock held for the upgrade transaction: BEGIN
IMMEDIATE on SQLite, a transaction-scoped advisory lock on PostgreSQL.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from adqueue.store.session import Store
from migrations import LOCATION

_ADVISORY_LOCK_KEY = 0x61647175  # "adqu"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(LOCATION))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def ensure_schema(store: Store) -> bool:
    """Upgrade to head if needed. Returns True when this call changed the schema."""
    head = head_revision()
    with store.engine.connect() as connection:
        if current_revision(connection) == head:
            return False
    return upgrade(store)


def upgrade(store: Store) -> bool:
    head = head_revision()
    with store.engine.begin() as connection:
        if store.dialect == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
        if current_revision(connection) == head:
            return False
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return True
