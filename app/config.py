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
    # How often the service copies SQLite's WAL into the database file (app.db's
    # WalCheckpointer), so the writer need not; 0 leaves it to the writer's commits.
    sqlite_checkpoint_seconds: float = Field(default=0.2, ge=0)

    # Signs member tokens (HS256). Must be set outside development.
    secret_key: str = DEV_SECRET
    member_token_ttl_seconds: int = Field(default=2 * 3600, ge=60, le=7 * 24 * 3600)

    default_timezone: str = "Asia/Shanghai"
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    cors_origins: list[str] = []
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    # Member login: WeChat's API host (tests point it at a local fake), and the development
    # provider that logs in any openid without WeChat (None: on only in development).
    wechat_api_base: str = "https://api.weixin.qq.com"
    dev_login: bool | None = None

    # Inbound webhooks (Standard Webhooks): accepted clock skew, both ways.
    webhook_tolerance_seconds: int = Field(default=300, ge=1)
    # Idempotency keys (webhook-id, Idempotency-Key) are answered from the log this long.
    idempotency_retention_hours: int = Field(default=72, ge=24)
    # The event log itself (audit, replay, analytics windows); 0 keeps it forever.
    event_retention_days: int = Field(default=90, ge=0)
    # How long an old secret keeps working after a rotation (inbound and outbound).
    secret_rotation_grace_seconds: int = Field(default=24 * 3600, ge=0)
    # Per-tenant token bucket on webhook and member-event ingestion, per instance; 0 = off.
    rate_limit_per_second: float = Field(default=1000.0, ge=0)
    rate_limit_burst: int = Field(default=2000, ge=1)

    # The write path: how many events may share one commit (and a lane may hold in flight
    # before member events go to the next), and how many writers (processes or threads)
    # (None: 1 on SQLite, which has one writer anyway; 2 on PostgreSQL).
    dispatch_max_batch: int = Field(default=256, ge=1)
    dispatch_writers: int | None = Field(default=None, ge=1, le=32)
    # Where the writers run: a process each beside the HTTP process (so the service uses a
    # core for HTTP and one per writer), or a thread each inside it (one core for all).
    dispatch_mode: Literal["process", "thread"] = "process"

    # Background work: timers, outbound deliveries, pruning. "off" when another process
    # runs `flywheel worker`.
    workers: Literal["on", "off"] = "on"
    worker_poll_seconds: float = Field(default=1.0, gt=0)
    timer_batch: int = Field(default=200, ge=1)
    outbox_batch: int = Field(default=50, ge=1)
    outbox_concurrency: int = Field(default=16, ge=1)
    outbox_lease_seconds: int = Field(default=120, ge=5)
    delivery_timeout_seconds: float = Field(default=10.0, gt=0)
    # Action endpoints on private or loopback addresses (SSRF guard); None: allowed
    # everywhere but production.
    allow_private_action_urls: bool | None = None

    @model_validator(mode="after")
    def _refuse_default_secret(self) -> Settings:
        if self.env == "production" and self.dev_login:
            raise ValueError("FLYWHEEL_DEV_LOGIN would let anyone log in as anyone in production")
        if self.env == "production" and self.secret_key == DEV_SECRET:
            raise ValueError("FLYWHEEL_SECRET_KEY must be set in production")
        if self.env == "production" and len(self.secret_key) < 32:
            raise ValueError("FLYWHEEL_SECRET_KEY must be at least 32 characters in production")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def writers(self) -> int:
        return self.dispatch_writers or (1 if self.is_sqlite else 2)

    @property
    def dev_login_enabled(self) -> bool:
        return self.env == "development" if self.dev_login is None else self.dev_login

    @property
    def private_action_urls_allowed(self) -> bool:
        if self.allow_private_action_urls is None:
            return self.env != "production"
        return self.allow_private_action_urls


@lru_cache
def get_settings() -> Settings:
    return Settings()
