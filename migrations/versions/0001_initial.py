"""Initial schema: models, jobs, shards, results, metrics.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("detector", sa.String(50), nullable=False),
        sa.Column("backbone", sa.String(100)),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("artifact_path", sa.Text(), nullable=False),
        sa.Column("threshold", sa.Float()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("train_job_id", sa.Integer()),
        sa.UniqueConstraint("name", "version", name="uq_models_name_version"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id")),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("n_total", sa.Integer(), nullable=False),
        sa.Column("n_done", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(200)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("heartbeat_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_table(
        "shards",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(200)),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("items", sa.JSON(), nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("error", sa.Text()),
        sa.UniqueConstraint("job_id", "seq", name="uq_shards_job_seq"),
    )
    op.create_index("ix_shards_job_status", "shards", ["job_id", "status"])
    op.create_table(
        "results",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id")),
        sa.Column("shard_id", sa.Integer()),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("score", sa.Float()),
        sa.Column("is_anomaly", sa.Boolean()),
        sa.Column("heatmap_path", sa.Text()),
        sa.Column("error", sa.Text()),
        sa.Column("width", sa.Integer()),
        sa.Column("height", sa.Integer()),
        sa.Column("label", sa.Integer()),
        sa.Column("defect", sa.String(100)),
        sa.Column("scores", sa.JSON()),
        sa.Column("scored_at", TS, nullable=False),
        sa.UniqueConstraint("job_id", "path", name="uq_results_job_path"),
    )
    op.create_index("ix_results_job_score", "results", ["job_id", "score"])
    op.create_index("ix_results_model", "results", ["model_id"])
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE")),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("value", sa.Float()),
        sa.Column("dataset", sa.Text()),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_metrics_model", "metrics", ["model_id"])


def downgrade() -> None:
    op.drop_table("metrics")
    op.drop_table("results")
    op.drop_table("shards")
    op.drop_table("jobs")
    op.drop_table("models")
