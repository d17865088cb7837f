"""Alembic environment and revisions for the adqueue schema (SQLite and PostgreSQL)."""

from pathlib import Path

LOCATION = Path(__file__).resolve().parent
