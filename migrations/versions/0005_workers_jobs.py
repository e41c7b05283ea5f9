"""report.due_at (a re-send asked for is due at once), export_job.updated_at (exports run
by the workers: when the job was handed out, then the worker's heartbeat) and upload_job
(uploads classified by the workers)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 23:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("report") as batch:
        batch.add_column(sa.Column("due_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("export_job") as batch:
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "upload_job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("requested_by", sa.String(length=64), nullable=False),
        sa.Column("file_name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("pending", sa.String(length=1024), nullable=True),
        sa.Column("keep", sa.Boolean(), nullable=False),
        sa.Column("kept", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("answer", sa.JSON(), nullable=False),
        sa.Column("error", sa.String(length=1024), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_upload_job_requested_by", "upload_job", ["requested_by"])
    op.create_index("ix_upload_job_status", "upload_job", ["status"])
    op.create_index("ix_upload_job_created_at", "upload_job", ["created_at"])


def downgrade() -> None:
    op.drop_table("upload_job")
    with op.batch_alter_table("export_job") as batch:
        batch.drop_column("updated_at")
    with op.batch_alter_table("report") as batch:
        batch.drop_column("due_at")
