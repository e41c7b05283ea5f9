"""Sign-in throttling and audit client addresses (web UI hardening)

Failed sign-ins are counted per client address and per user name in ``sign_in_throttle``
(``node.records.sign_in``), replacing the per-account lock-out columns of ``app_user``;
audit events record the client address they came from.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 04:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sign_in_throttle",
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("blocked_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_sign_in_throttle_last_failure_at", "sign_in_throttle", ["last_failure_at"])
    with op.batch_alter_table("audit_event") as batch:
        batch.add_column(sa.Column("client_address", sa.String(length=64), nullable=True))
        batch.create_index("ix_audit_event_client_address", ["client_address"])
    with op.batch_alter_table("app_user") as batch:
        batch.drop_column("failed_logins")
        batch.drop_column("locked_until")


def downgrade() -> None:
    with op.batch_alter_table("app_user") as batch:
        batch.add_column(
            sa.Column("failed_logins", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("audit_event") as batch:
        batch.drop_index("ix_audit_event_client_address")
        batch.drop_column("client_address")
    op.drop_index("ix_sign_in_throttle_last_failure_at", table_name="sign_in_throttle")
    op.drop_table("sign_in_throttle")
