"""Run the Alembic migrations programmatically (``kmsg migrate``, the compose ``migrate`` step)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import make_engine

__all__ = ["alembic_config", "current_revision", "head_revision", "upgrade"]

_INI = Path(__file__).resolve().parent.parent / "migrations" / "alembic.ini"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations and ``url`` (default: the settings)."""
    cfg = Config(str(_INI))
    cfg.set_main_option("script_location", str(_INI.parent))
    cfg.set_main_option("sqlalchemy.url", (url or Settings.from_env().database_url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    """The newest migration shipped with this version."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str | None = None) -> str | None:
    """The revision the database is at (``None`` when never migrated)."""
    engine = make_engine(url or Settings.from_env().database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
