"""Metrics the web UI's /metrics reads from the database (counts the SCP keeps)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 05:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scp_stat",
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "reason"),
    )


def downgrade() -> None:
    op.drop_table("scp_stat")
