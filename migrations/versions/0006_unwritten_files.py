"""Files a job could not write (a full disk): heat maps and evaluation maps, and why.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("n_heatmaps_unwritten", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("n_eval_maps_unwritten", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("unwritten_reason", sa.Text()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("unwritten_reason")
        batch.drop_column("n_eval_maps_unwritten")
        batch.drop_column("n_heatmaps_unwritten")
