"""Storage: migrations match the models, SQLite pragmas, the JSON Schema file is in sync."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from app.engine.definition import json_schema
from app.migrations import drift
from tests.conftest import FUNNELS


def test_migrations_have_no_drift_from_the_models(engine):
    assert drift(engine) == []


def test_sqlite_runs_in_wal_with_foreign_keys_and_a_roomy_checkpoint(engine):
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite pragmas; PostgreSQL has none")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 5000
        assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == 10000
        assert conn.execute(text("PRAGMA journal_size_limit")).scalar() == 64 * 1024 * 1024


def test_published_json_schema_is_generated_from_the_models():
    on_disk = json.loads((FUNNELS / "funnel.schema.json").read_text(encoding="utf-8"))
    assert on_disk == json_schema(), "run `make schema` to regenerate funnels/funnel.schema.json"


def test_schema_keys_equal_the_parser_keys():
    from app.engine.definition import FunnelDefinition

    schema = json_schema()
    fields = {f.alias or name for name, f in FunnelDefinition.model_fields.items()}
    assert set(schema["properties"]) == fields
    assert schema["additionalProperties"] is False
