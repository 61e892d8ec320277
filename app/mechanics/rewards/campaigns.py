"""Finding a funnel's rewards campaigns: the ones running now (for watchers), and the one a
member's command names (404 if unknown, 409 if of another kind or not running)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from app.errors import Refused
from app.funnels import store
from app.mechanics.commands import Context, campaign_config


def not_running(cfg: Any, now: datetime) -> str | None:
    """Why the campaign is not running at `now` (a reason code), or None."""
    if cfg.starts_at and now < cfg.starts_at:
        return "campaign_not_started"
    if cfg.ends_at and now >= cfg.ends_at:
        return "campaign_ended"
    return None


def running(
    conn: Connection, versions: list[store.VersionRef], kind: str, now: datetime
) -> Iterator[tuple[store.VersionRef, Any, str, Any]]:
    """(funnel ref, compiled funnel, name, campaign) for each rewards campaign of `kind`
    running at `now` in the open funnel versions."""
    for ref in versions:
        funnel = store.compiled_version(conn, ref)
        for name, cfg in funnel.definition.mechanics.rewards.items():
            if cfg.kind == kind and not_running(cfg, now) is None:
                yield ref, funnel, name, cfg


def reward_campaign(
    ctx: Context, kinds: tuple[str, ...], *, must_run: bool = True
) -> tuple[store.VersionRef, Any, Any]:
    """(funnel ref, campaign, compiled funnel) of the command's `funnel` and `campaign`: one
    of `kinds`, and (with `must_run`) running now."""
    ref, cfg = campaign_config(ctx, ctx.data["funnel"], "rewards", ctx.data["campaign"])
    if cfg.kind not in kinds:
        raise Refused(
            "wrong_campaign_kind",
            f'rewards campaign "{ctx.data["campaign"]}" is a {cfg.kind}, '
            f"not a {' or '.join(kinds)}",
        )
    if must_run and (reason := not_running(cfg, ctx.now)):
        raise Refused(reason, f'"{cfg.title}" is not running now')
    return ref, cfg, store.compiled_version(ctx.conn, ref)
