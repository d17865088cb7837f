"""The one write of the morning review (`adqueue serve`): a person's verdict on a result.

Verdicts are appended, never updated: a result reviewed twice keeps both rows and the latest one
counts (web/queries.py reads it), so who changed their mind, and when, stays in SQL.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from adqueue.core.errors import AdqueueError
from adqueue.store.models import Result, Review, ReviewVerdict

MAX_REVIEWER_CHARS = 200  # the column's width
ANONYMOUS = "anonymous"


class ReviewError(AdqueueError):
    """A review that cannot be recorded: an unknown verdict or no such result."""


def clean_reviewer(name: str | None) -> str:
    """A reviewer name fit to store and show: printable, trimmed, bounded; "anonymous" if empty."""
    printable = "".join(ch for ch in (name or "") if ch.isprintable()).strip()
    return printable[:MAX_REVIEWER_CHARS] or ANONYMOUS


def record_review(session: Session, result_id: int, verdict: str, reviewer: str | None) -> Review:
    """Add one verdict on result `result_id` and return the new row (flushed: it has its id)."""
    if verdict not in set(ReviewVerdict):
        raise ReviewError(f"unknown verdict {verdict!r}: use one of {', '.join(ReviewVerdict)}")
    if session.scalar(select(Result.id).where(Result.id == result_id)) is None:
        raise ReviewError(f"no result {result_id}")
    review = Review(result_id=result_id, verdict=verdict, reviewer=clean_reviewer(reviewer))
    session.add(review)
    session.flush()
    return review
