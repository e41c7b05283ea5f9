"""labels on studies and series; model activations

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 23:50:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "label",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=True),
        sa.Column("keyword", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "series_id", "keyword", name="uq_label"),
    )
    with op.batch_alter_table("label", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_label_study_id"), ["study_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_label_series_id"), ["series_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_label_keyword"), ["keyword"], unique=False)
        batch_op.create_index(batch_op.f("ix_label_created_at"), ["created_at"], unique=False)

    op.create_table(
        "model_activation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("activated_by", sa.String(length=128), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("model_activation", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_activation_activated_at"), ["activated_at"], unique=False
        )


def downgrade() -> None:
    op.drop_table("model_activation")
    op.drop_table("label")
