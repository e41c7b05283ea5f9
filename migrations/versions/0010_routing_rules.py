"""Routing rules (which stable studies are analysed, and which series); the series' Body
Part Examined and Slice Thickness, which the rules look at

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 05:30:00.000000
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# The rules that reproduce the node before routing: every stable study is analysed, and
# of its axial CT images the largest series (written out: a migration never imports the
# node's code, which moves on).
DEFAULTS = [
    {"kind": "study", "position": 1, "name": "Analyse every study", "action": "analyze"},
    {"kind": "series", "position": 1, "name": "Largest axial CT series", "action": "largest"},
]


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("body_part_examined", sa.Text(), nullable=True))
        batch.add_column(sa.Column("slice_thickness", sa.Float(), nullable=True))
    rules = op.create_table(
        "routing_rule",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("conditions", sa.JSON(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('study','series')", name="ck_routing_rule_kind"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_routing_rule_kind", "routing_rule", ["kind"])
    now = datetime.now(UTC)
    op.bulk_insert(
        rules,
        [
            {**rule, "conditions": {}, "updated_by": "migration", "updated_at": now}
            for rule in DEFAULTS
        ],
    )


def downgrade() -> None:
    op.drop_index("ix_routing_rule_kind", table_name="routing_rule")
    op.drop_table("routing_rule")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("slice_thickness")
        batch.drop_column("body_part_examined")
