"""Over-long and non-conforming attribute values are stored (ingest hardening)

The received values of study, series and instance (and the analysed instances' UIDs)
become TEXT: on PostgreSQL a VARCHAR(n) refuses a longer value, and a PACS that sends a
40-character accession number or a UUID as a UID would be answered "out of resources"
for ever.

On SQLite a column's declared length is never enforced, and VARCHAR(n) and TEXT have the
same (TEXT) affinity, so nothing stored changes: only the declared types are rewritten,
in place, through ``writable_schema`` (the route SQLite documents for changes that do
not touch stored content). Alembic's batch mode would copy each of these tables, every
instance row of the node included, for a change that alters no stored byte.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 04:30:00.000000
"""

import re

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# table -> {column: its former VARCHAR length}
COLUMNS = {
    "study": {
        "study_instance_uid": 64,
        "patient_id": 64,
        "patient_name": 324,
        "study_date": 8,
        "study_time": 16,
        "accession_number": 16,
        "study_description": 64,
        "modalities": 64,
    },
    "series": {"series_instance_uid": 64, "modality": 16, "series_description": 64},
    "instance": {
        "sop_instance_uid": 64,
        "sop_class_uid": 64,
        "transfer_syntax_uid": 64,
        "source_ae": 16,
    },
    "slice_prediction": {"sop_instance_uid": 64},
}


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_declared_types(
            {
                t: {c: (f"VARCHAR({n})", "TEXT") for c, n in cols.items()}
                for t, cols in COLUMNS.items()
            }
        )
        return
    for table, columns in COLUMNS.items():
        for column, length in columns.items():
            op.alter_column(table, column, type_=sa.Text(), existing_type=sa.String(length))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_declared_types(
            {
                t: {c: ("TEXT", f"VARCHAR({n})") for c, n in cols.items()}
                for t, cols in COLUMNS.items()
            }
        )
        return
    for table, columns in COLUMNS.items():
        for column, length in columns.items():
            op.alter_column(
                table,
                column,
                type_=sa.String(length),
                existing_type=sa.Text(),
                postgresql_using=f"left({column}, {length})",
            )


def _sqlite_declared_types(changes: dict[str, dict[str, tuple[str, str]]]) -> None:
    """Rewrite declared column types in SQLite's schema (same affinity: no data changes)."""
    bind = op.get_bind()
    statements = {}
    for table, columns in changes.items():
        sql = bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).scalar_one()
        for column, (old, new) in columns.items():
            pattern = re.compile(rf"(\b{column}\s+){re.escape(old)}(?=[\s,)])", re.IGNORECASE)
            sql, count = pattern.subn(rf"\g<1>{new}", sql)
            if count != 1:
                raise RuntimeError(f"{table}.{column} is not declared {old} as expected")
        statements[table] = sql
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar_one()
    bind.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        for table, sql in statements.items():
            bind.exec_driver_sql(
                "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?", (sql, table)
            )
        bind.exec_driver_sql(f"PRAGMA schema_version = {version + 1}")
    finally:
        bind.exec_driver_sql("PRAGMA writable_schema = OFF")
    check = bind.exec_driver_sql("PRAGMA integrity_check").scalar_one()
    if check != "ok":
        raise RuntimeError(f"SQLite integrity check failed after the type change: {check}")
