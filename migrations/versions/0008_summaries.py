"""Job summaries kept as shards close, and partial indexes for the review's flagged and error pages.

The summaries of jobs that existed before this revision are built from their rows by
`adqueue db upgrade` and by the reconciler (store/summaries.py), not here: a migration holds the
schema lock, and a month of nights takes minutes to read.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _counts(kind: sa.types.TypeEngine) -> list[sa.Column]:
    return [sa.Column(name, kind, nullable=False, server_default="0")
            for name in ("n_rows", "n_scored", "n_flagged", "n_errors")]


def upgrade() -> None:
    def job() -> sa.ForeignKey:
        return sa.ForeignKey("jobs.id", ondelete="CASCADE")

    op.create_table(
        "job_summaries",
        sa.Column("job_id", sa.Integer(), job(), primary_key=True),
        *_counts(sa.BigInteger()),
        sa.Column("n_normal", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("histogram", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "shard_summaries",
        sa.Column("job_id", sa.Integer(), job(), primary_key=True),
        sa.Column("shard_id", sa.Integer(), primary_key=True, autoincrement=False),
        *_counts(sa.Integer()),
        sa.Column("n_normal", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("histogram", sa.JSON(), nullable=False),
        sa.Column("folders", sa.JSON(), nullable=False),
    )
    op.create_table(
        "job_folders",
        sa.Column("job_id", sa.Integer(), job(), primary_key=True),
        sa.Column("folder", sa.Text(), primary_key=True),
        *_counts(sa.BigInteger()),
    )
    op.create_index("ix_results_flagged", "results", ["job_id", "score", "id"],
                    sqlite_where=sa.text("is_anomaly IS 1"), postgresql_where=sa.text("is_anomaly IS true"))
    op.create_index("ix_results_errors", "results", ["job_id", "path"],
                    sqlite_where=sa.text("error IS NOT NULL"), postgresql_where=sa.text("error IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_results_errors", table_name="results")
    op.drop_index("ix_results_flagged", table_name="results")
    op.drop_table("job_folders")
    op.drop_table("shard_summaries")
    op.drop_table("job_summaries")
