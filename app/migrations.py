"""Run Alembic from code: the CLI's `migrate`, and the tests' database set-up."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine

from alembic import command

# The source tree in development; the working directory when installed as a package (Docker).
ROOT = Path(__file__).resolve().parent.parent
if not (ROOT / "alembic.ini").exists():
    ROOT = Path.cwd()


def alembic_config(url: str | None = None) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    if url:
        config.attributes["url"] = url
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def drift(engine: Engine) -> list[object]:
    """Differences between the models and the migrated database (empty when in sync)."""
    import app.models
    from app.db import metadata

    assert app.models
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))
