"""Retention of received pixel data: when a study's and an instance's pixel data was removed
(``node.workflow.retention``), and the bytes freed

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 05:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.add_column(sa.Column("pixels_removed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("pixels_removed_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("instance") as batch:
        batch.add_column(sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # The removed files do not come back: a downgrade only forgets that they were removed.
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("removed_at")
    with op.batch_alter_table("study") as batch:
        batch.drop_column("pixels_removed_bytes")
        batch.drop_column("pixels_removed_at")
