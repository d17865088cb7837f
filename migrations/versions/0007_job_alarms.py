"""Alarms and notifications at a job's end: what was wrong with it, and whether people were told.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("alarms", sa.JSON()))
    op.add_column("jobs", sa.Column("drift_ks", sa.Float()))
    op.add_column("jobs", sa.Column("notified_at", sa.DateTime(timezone=True)))
    op.add_column("jobs", sa.Column("notify_attempts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("notify_after", sa.DateTime(timezone=True)))
    op.add_column("jobs", sa.Column("notification", sa.JSON()))
    # Jobs that ended before alarms existed are not announced now, all at once.
    op.execute("UPDATE jobs SET notified_at = COALESCE(finished_at, created_at) "
               "WHERE status IN ('done', 'failed', 'cancelled')")


def downgrade() -> None:
    for column in ("notification", "notify_after", "notify_attempts", "notified_at", "drift_ks", "alarms"):
        op.drop_column("jobs", column)
