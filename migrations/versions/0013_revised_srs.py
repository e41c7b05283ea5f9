"""Revised SRs: why and when a report was made (``kind``, ``opened_at``), the report whose
SR it replaces (its Predecessor Documents Sequence) and, for a radiologist's correction,
the verdict it states

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 05:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("report") as batch:
        # every report before this revision is a model result
        batch.add_column(
            sa.Column(
                "kind", sa.String(length=16), nullable=False, server_default=sa.text("'model'")
            )
        )
        batch.add_column(sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("replaces_report_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("verdict_id", sa.Integer(), nullable=True))
        batch.create_index("ix_report_replaces_report_id", ["replaces_report_id"], unique=False)
        batch.create_foreign_key(
            "fk_report_replaces_report_id",
            "report",
            ["replaces_report_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_foreign_key(
            "fk_report_verdict_id", "verdict", ["verdict_id"], ["id"], ondelete="SET NULL"
        )


def downgrade() -> None:
    with op.batch_alter_table("report") as batch:
        batch.drop_constraint("fk_report_verdict_id", type_="foreignkey")
        batch.drop_constraint("fk_report_replaces_report_id", type_="foreignkey")
        batch.drop_index("ix_report_replaces_report_id")
        batch.drop_column("verdict_id")
        batch.drop_column("replaces_report_id")
        batch.drop_column("opened_at")
        batch.drop_column("kind")
