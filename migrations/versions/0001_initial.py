"""initial schema: study, series, instance

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-25 19:35:21.947202
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "study",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("patient_name", sa.String(length=324), nullable=True),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("study_time", sa.String(length=16), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("study_description", sa.String(length=64), nullable=True),
        sa.Column("modalities", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.String(length=1024), nullable=True),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("series_count", sa.Integer(), nullable=False),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('receiving','stable','queued','analyzing','analyzed','reported','failed')",
            name="ck_study_status",
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_study_last_received_at"), ["last_received_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_study_status"), ["status"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_study_study_instance_uid"), ["study_instance_uid"], unique=True
        )

    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=64), nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_series_series_instance_uid"), ["series_instance_uid"], unique=True
        )
        batch_op.create_index(batch_op.f("ix_series_study_id"), ["study_id"], unique=False)

    op.create_table(
        "instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("store_key", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("source_ae", sa.String(length=16), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instance_series_id"), ["series_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_instance_sop_instance_uid"), ["sop_instance_uid"], unique=True
        )


def downgrade() -> None:

    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_sop_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_instance_series_id"))

    op.drop_table("instance")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_study_id"))
        batch_op.drop_index(batch_op.f("ix_series_series_instance_uid"))

    op.drop_table("series")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_study_status"))
        batch_op.drop_index(batch_op.f("ix_study_last_received_at"))

    op.drop_table("study")
