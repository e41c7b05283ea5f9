"""Analysis attempts, heartbeats and report claims (workflow hardening)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 04:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.add_column(
            sa.Column("analysis_attempts", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("analysis") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("report") as batch:
        batch.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("report") as batch:
        batch.drop_column("failing_since")
        batch.drop_column("claimed_at")
    with op.batch_alter_table("analysis") as batch:
        batch.drop_column("heartbeat_at")
    with op.batch_alter_table("study") as batch:
        batch.drop_column("analysis_attempts")
