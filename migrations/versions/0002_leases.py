"""Leases with fencing: a runs table, lease and outbox columns on jobs and shards.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("shard_id", sa.Integer()),
        sa.Column("worker", sa.String(200)),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_runs_job", "runs", ["job_id"])
    op.create_index("ix_runs_shard", "runs", ["shard_id"])
    for column in (
        sa.Column("queue", sa.String(200)),
        sa.Column("submitted_at", TS),
        sa.Column("run_id", sa.Integer()),
        sa.Column("lease_expires_at", TS),
        sa.Column("enqueued_at", TS),
    ):
        op.add_column("jobs", column)
    for column in (
        sa.Column("run_id", sa.Integer()),
        sa.Column("lease_expires_at", TS),
        sa.Column("enqueued_at", TS),
        sa.Column("n_ok", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("n_failed", sa.Integer(), nullable=False, server_default="0"),
    ):
        op.add_column("shards", column)
    op.create_index("ix_shards_status_lease", "shards", ["status", "lease_expires_at"])
    op.add_column("results", sa.Column("run_id", sa.Integer()))
    # Jobs submitted before this revision wrote all their shards before leaving `submitting`.
    op.execute("UPDATE jobs SET submitted_at = created_at WHERE status <> 'submitting'")


def downgrade() -> None:
    op.drop_column("results", "run_id")
    op.drop_index("ix_shards_status_lease", table_name="shards")
    for name in ("n_failed", "n_ok", "enqueued_at", "lease_expires_at", "run_id"):
        op.drop_column("shards", name)
    for name in ("enqueued_at", "lease_expires_at", "run_id", "submitted_at", "queue"):
        op.drop_column("jobs", name)
    op.drop_table("runs")
