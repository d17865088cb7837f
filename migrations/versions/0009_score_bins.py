"""A job's score histogram as one row per bin instead of one JSON value on the summary.

Every shard's close merged its few hundred bins into the job's JSON histogram (thousands of keys):
the database parsed, summed and rewrote the whole value, about 6 ms of CPU per close, under the job
row's lock that orders the closers. A row per bin takes an additive upsert of the shard's bins only.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_score_bins",
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("bin", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("INSERT INTO job_score_bins (job_id, bin, n) SELECT job_id, key::bigint, value::text::bigint "
                   "FROM job_summaries, json_each(job_summaries.histogram)")
    else:
        op.execute("INSERT INTO job_score_bins (job_id, bin, n) SELECT job_id, CAST(key AS INTEGER), value "
                   "FROM job_summaries, json_each(job_summaries.histogram)")
    with op.batch_alter_table("job_summaries") as batch:
        batch.drop_column("histogram")


def downgrade() -> None:
    with op.batch_alter_table("job_summaries") as batch:
        batch.add_column(sa.Column("histogram", sa.JSON(), nullable=False, server_default="{}"))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE job_summaries SET histogram = COALESCE((SELECT json_object_agg(bin, n) "
                   "FROM job_score_bins WHERE job_score_bins.job_id = job_summaries.job_id), '{}'::json)")
    else:
        op.execute("UPDATE job_summaries SET histogram = COALESCE((SELECT json_group_object(bin, n) "
                   "FROM job_score_bins WHERE job_score_bins.job_id = job_summaries.job_id), '{}')")
    op.drop_table("job_score_bins")
