"""Settings, read from FLYWHEEL_* environment variables (and an optional .env file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET = "dev-only-insecure-secret-change-me"  # noqa: S105 - refused outside development
DEFAULT_SQLITE_PATH = Path("var") / "flywheel.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", env_file=".env", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    database_url: str = f"sqlite:///{DEFAULT_SQLITE_PATH}"
    # PostgreSQL connection pool (ignored for SQLite, which uses one connection per thread).
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    sqlite_busy_timeout_ms: int = Field(default=5000, ge=0)

    # Signs member tokens (HS256). Must be set outside development.
    secret_key: str = DEV_SECRET
    member_token_ttl_seconds: int = Field(default=2 * 3600, ge=60, le=7 * 24 * 3600)

    default_timezone: str = "Asia/Shanghai"
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    cors_origins: list[str] = []

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> Settings:
        if self.env == "production" and self.secret_key == DEV_SECRET:
            raise ValueError("FLYWHEEL_SECRET_KEY must be set in production")
        if self.env == "production" and len(self.secret_key) < 32:
            raise ValueError("FLYWHEEL_SECRET_KEY must be at least 32 characters in production")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
