"""Sign-in throttling and audit client addresses (web UI hardening)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 04:30:00.000000
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
