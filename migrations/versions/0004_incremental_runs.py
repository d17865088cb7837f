"""Incremental nightly runs: what a file was when it was read, and how many a job skipped.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("results", sa.Column("file_size", sa.BigInteger()))
    op.add_column("results", sa.Column("file_mtime_ns", sa.BigInteger()))
    op.create_index("ix_results_model_path", "results", ["model_id", "path"])
    op.add_column("jobs", sa.Column("n_skipped", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("jobs", "n_skipped")
    op.drop_index("ix_results_model_path", table_name="results")
    op.drop_column("results", "file_mtime_ns")
    op.drop_column("results", "file_size")
