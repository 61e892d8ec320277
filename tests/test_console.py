"""The console in a real headless Chromium: the page loads against a seeded database, its
numbers match the report API, the chart script ran (offline: it is served by the service),
and a screenshot is saved to test-artifacts/. Under CI=true a missing browser fails."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, insert

from app.clock import FrozenClock
from app.outbox.models import Outbox
from tests.conftest import IN_CI, T0
from tests.servers import LocalServer
from tests.test_analytics import Mini

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "Chromium is not installed (apt-get install chromium): the console test needs it"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def browse(browser: str, profile: Path, url: str, *extra: str) -> str:
    done = subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def seed(mini: Mini, engine: Engine) -> None:
    for i in range(6):
        mini.send("member.joined", f"m{i}", group_id="g1", channel="poster" if i % 2 else "qr")
    mini.clock.advance(timedelta(minutes=30))
    for i in range(4):
        mini.send("message.posted", f"m{i}", group_id="g1", message_id=f"x{i}")
    mini.clock.advance(timedelta(hours=3))
    mini.send("order.paid", "m1", order_id="o1", amount_fen=4200)
    with engine.begin() as conn:  # an action the merchant's endpoint never acknowledged
        conn.execute(
            insert(Outbox.__table__),  # type: ignore[attr-defined]
            {
                "tenant_id": 1,
                "source": "states.joined.on_enter[0]",
                "type": "send_message",
                "payload": {},
                "status": "dead",
                "order_at": T0,
                "next_attempt_at": T0,
                "attempts": 8,
                "last_error": "connection refused",
                "created_at": T0,
            },
        )


def test_the_console_shows_the_reports_numbers_in_chromium(
    engine: Engine, clock: FrozenClock, tmp_path: Path
) -> None:
    browser = chromium()
    mini = Mini(engine, clock)
    seed(mini, engine)
    api = mini.get("/v1/reports/funnels/mini")
    server = LocalServer(mini.client.app)
    server.start()
    try:
        link = httpx.post(f"{server.base_url}/v1/console/links", headers=mini.admin).json()
        url = server.base_url + link["url"]
        dom = browse(browser, tmp_path / "profile", url, "--dump-dom")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / f"console-{engine.dialect.name}.png"
        shot.unlink(missing_ok=True)
        browse(
            browser, tmp_path / "profile", url, f"--screenshot={shot}", "--window-size=1280,2200"
        )
    finally:
        server.stop()

    shown = {
        stage: int(n)
        for stage, n in re.findall(
            r'<tr data-stage="(\w+)">\s*<td>\w+</td>\s*<td class="n entered">(\d+)</td>', dom
        )
    }
    assert (
        shown
        == {s["stage"]: s["entered"] for s in api["stages"]}
        == {
            "acquire": 6,
            "activate": 4,
            "revenue": 1,
        }
    )
    conversions = re.findall(r'<td class="n conversion">([^<]*)</td>', dom)
    assert conversions == ["66.7%", "25.0%", "–"]
    # The chart script ran in the browser and drew the same numbers.
    drawn = re.search(r'id="funnel-chart"[^>]*data-rendered="([^"]*)"', dom)
    assert drawn is not None, "the chart script did not run"
    assert drawn.group(1) == ",".join(f"{s['stage']} {s['entered']}" for s in api["stages"])
    assert re.search(r'id="daily-chart"[^>]*data-rendered="30"', dom)
    # The failed delivery is listed with its replay button.
    assert "connection refused" in dom and 'action="/console/deliveries/act_1/replay"' in dom
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000


def hardened(r: httpx.Response) -> None:
    """The console's security headers: no inline or foreign script or style, never framed,
    no referrer (sign-in links carry a token), nothing cached."""
    csp = dict(
        part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";")
    )
    assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
    assert csp["script-src"] == csp["style-src"] == "'self'"  # no 'unsafe-inline'
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"


def test_sign_in_csrf_and_the_replay_button(engine: Engine, clock: FrozenClock) -> None:
    import asyncio

    mini = Mini(engine, clock)
    seed(mini, engine)
    key = mini.admin["Authorization"].removeprefix("Bearer ")

    async def go() -> None:
        transport = httpx.ASGITransport(app=mini.client.app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            r = await c.get("/console")
            assert r.status_code == 200 and 'action="/console/login"' in r.text
            hardened(r)
            for asset in ("chart.js", "console.css"):
                hardened(await c.get(f"/console/static/{asset}"))
            assert (await c.get("/console/static/../routes.py")).status_code == 404
            r = await c.post("/console/login", data={"key": "fw_wrong"})
            assert r.status_code == 401 and "unknown or revoked" in r.text
            r = await c.get("/console/enter", params={"token": "forged"})
            assert r.status_code == 401 and "invalid or has expired" in r.text
            r = await c.post("/console/login", data={"key": key})
            assert r.status_code == 303
            hardened(r)
            cookie = r.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie and key not in cookie
            page = (await c.get("/console")).text
            csrf = re.search(r'name="csrf" value="(\w+)"', page)
            assert csrf is not None
            r = await c.post("/console/deliveries/act_1/replay", data={"csrf": "x" * 64})
            assert r.status_code == 403
            r = await c.post(
                "/console/deliveries/act_1/replay", data={"csrf": csrf.group(1), "funnel": "mini"}
            )
            assert r.status_code == 303 and r.headers["location"].startswith("/console?replayed=")
            r = await c.get(r.headers["location"])
            assert "Delivery act_1 is queued again" in r.text and "Nothing failed" in r.text
            r = await c.post("/console/deliveries/act_1/replay", data={"csrf": csrf.group(1)})
            assert r.status_code == 409  # pending now: nothing to replay
            r = await c.get("/console", params={"from": "2026-12-05", "to": "2026-12-01"})
            assert r.status_code == 422 and "after it ends" in r.text
            await c.post("/console/logout")
            c.cookies.clear()
            r = await c.post("/console/deliveries/act_1/replay", data={"csrf": csrf.group(1)})
            assert r.status_code == 401

    asyncio.run(go())
