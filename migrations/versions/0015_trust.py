"""What a radiologist needs to trust an answer: calibration, operating point, OOD, key slices

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04 12:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("analysis") as batch:
        batch.add_column(
            sa.Column("assessment", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )
        batch.add_column(
            sa.Column(
                "outside_experience", sa.Boolean(), nullable=False, server_default=sa.text("false")
            )
        )
        batch.create_index("ix_analysis_outside_experience", ["outside_experience"])


def downgrade() -> None:
    with op.batch_alter_table("analysis") as batch:
        batch.drop_index("ix_analysis_outside_experience")
        batch.drop_column("outside_experience")
        batch.drop_column("assessment")
