"""Time as adqueue stores it: timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without a zone; they are stored in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
