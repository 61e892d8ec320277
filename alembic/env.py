"""Alembic environment: the models' metadata, the service's own engine settings."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import JSON
from sqlalchemy.engine import Connection

import app.models  # noqa: F401  (registers every table on the metadata)
from alembic import context
from app.config import get_settings
from app.db import make_engine, metadata
from app.db_types import UTCDateTime

config = context.config


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Render the project's own column types by their import path."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        autogen_context.imports.add("import app.db_types")
        return "app.db_types.UTCDateTime()"
    if type_ == "type" and isinstance(obj, JSON) and "postgresql" in obj._variant_mapping:
        autogen_context.imports.add("import app.db_types")
        return "app.db_types.JSONType"
    return False


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = config.attributes.get("url") or get_settings().database_url
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
main()
