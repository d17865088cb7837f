"""Bring a database to the schema this code expects, safely from several processes at once.

Every verb calls `ensure_schema`: a fresh SQLite file or an empty PostgreSQL database is set up on
first use. Concurrent callers serialize on a lock held for the upgrade transaction: BEGIN
IMMEDIATE on SQLite, a transaction-scoped advisory lock on PostgreSQL.

The usual call finds the schema at head, and answers that with one SELECT of alembic_version
against the head read from the revision files themselves; alembic (a tenth of a second to import)
is imported only to upgrade, or when those files are not the simple chain this scan understands.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from adqueue.migrations import LOCATION
from adqueue.store.session import Store

if TYPE_CHECKING:
    from alembic.config import Config

_ADVISORY_LOCK_KEY = 0x61647175  # "adqu"
# The lines alembic writes into every revision file (script.py.mako).
_REVISION = re.compile(r"^revision\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision\s*(?::[^=]+)?=\s*(None|['\"]([^'\"]+)['\"])\s*$", re.MULTILINE)


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(LOCATION))
    return config


def head_revision() -> str:
    """The newest revision, from the files in migrations/versions; alembic's answer if they are not
    one plain chain (a merge, a branch, a tuple of parents)."""
    head = scanned_head()
    if head is not None:
        return head
    from alembic.script import ScriptDirectory

    found = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert found is not None
    return found


def scanned_head() -> str | None:
    """The one revision no other revision names as its parent, or None when the files are not a
    simple chain of single-parent revisions."""
    parents: dict[str, str | None] = {}
    for path in sorted((LOCATION / "versions").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        revision, down = _REVISION.search(source), _DOWN_REVISION.search(source)
        if revision is None and down is None:
            continue  # not a revision (__init__.py)
        if revision is None or down is None or revision.group(1) in parents:
            return None
        parents[revision.group(1)] = down.group(2)
    heads = set(parents) - set(parents.values())
    roots = [revision for revision, parent in parents.items() if parent is None]
    if len(heads) != 1 or len(roots) != 1 or not set(parents.values()) - {None} <= set(parents):
        return None
    return heads.pop()


def current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def stored_revisions(store: Store) -> list[str]:
    """What alembic_version holds: [] on a fresh database (no such table yet)."""
    with store.engine.connect() as connection:
        try:
            return [row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))]
        except DBAPIError:
            return []  # no table (or no answer): the upgrade path below finds out which, under its lock


def ensure_schema(store: Store) -> bool:
    """Upgrade to head if needed. Returns True when this call changed the schema."""
    if stored_revisions(store) == [head_revision()]:
        return False
    return upgrade(store)


def upgrade(store: Store) -> bool:
    from alembic import command

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
