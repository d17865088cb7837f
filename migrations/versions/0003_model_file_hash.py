"""The model file's SHA-256, recorded at registration and checked at load.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("artifact_sha256", sa.String(64)))


def downgrade() -> None:
    op.drop_column("models", "artifact_sha256")
