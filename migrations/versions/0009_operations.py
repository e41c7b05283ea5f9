"""Study statuses ``ignored`` (no routing rule matched) and ``suspended`` (a person paused
it); the ``worker`` table (workers seen: host, queues, model, last heartbeat)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 05:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

OLD = "('receiving','stable','queued','analyzing','analyzed','reported','failed')"
NEW = (
    "('receiving','stable','queued','analyzing','analyzed','reported','failed',"
    "'ignored','suspended')"
)


def _status_check(values: str) -> None:
    with op.batch_alter_table("study") as batch:
        batch.drop_constraint("ck_study_status", type_="check")
        batch.create_check_constraint("ck_study_status", f"status IN {values}")


def upgrade() -> None:
    _status_check(NEW)
    with op.batch_alter_table("study") as batch:
        # where a suspended study goes back to when resumed
        batch.add_column(sa.Column("suspended_from", sa.String(length=16), nullable=True))
    op.create_table(
        "worker",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", sa.String(length=255), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_index("ix_worker_last_seen_at", "worker", ["last_seen_at"])


def downgrade() -> None:
    op.drop_index("ix_worker_last_seen_at", table_name="worker")
    op.drop_table("worker")
    op.execute(
        "UPDATE study SET status = COALESCE(suspended_from, 'stable') "
        "WHERE status IN ('ignored', 'suspended')"
    )
    with op.batch_alter_table("study") as batch:
        batch.drop_column("suspended_from")
    _status_check(OLD)
