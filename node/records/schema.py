"""Schema management through Alembic: upgrade, current revision, head check."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

import migrations


def alembic_config(database_url: str) -> Config:
    """An Alembic configuration pointing at the packaged migrations and ``database_url``."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind ``engine`` to ``revision``."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        try:
            with connection.begin():
                command.upgrade(config, revision)
        finally:
            if connection.dialect.name == "sqlite":
                # migrations/env.py turns foreign keys off to migrate, and its pragma to turn
                # them on again does nothing inside the transaction: this connection would go
                # back to the pool (the node's own, after build_node(migrate=True)) without
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it has never been migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest revision shipped with this version of the node."""
    config = alembic_config("sqlite://")
    return ScriptDirectory.from_config(config).get_current_head()


def require_current(engine: Engine) -> None:
    """Raise a clear error when the database is not at the shipped head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise RuntimeError(
            f"database schema is at {current or 'nothing'}, this node needs {head}: "
            "run `ainode db upgrade`"
        )
