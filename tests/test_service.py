"""The service as a whole: its OpenAPI document, background workers in the lifespan, logs,
and pruning of old idempotency keys."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from datetime import timedelta

from sqlalchemy import func, select

from app.events.models import EventLog, EventResponse
from app.observability import JsonFormatter, request_id
from tests.conftest import Client, Source, app_for, event, new_tenant
from tests.factories import welcome


def test_openapi_documents_every_inbound_event_type(client):
    doc = client.get("/openapi.json").json()
    body = doc["paths"]["/v1/webhooks/{source_id}"]["post"]["requestBody"]
    refs = [
        s["$ref"].rsplit("/", 1)[1] for s in body["content"]["application/json"]["schema"]["oneOf"]
    ]
    assert "OrderPaidEvent" in refs and "MessagePostedEvent" in refs and "CustomEvent" in refs
    schemas = doc["components"]["schemas"]
    assert all(name in schemas for name in refs)
    paid = schemas["OrderPaidEvent"]
    assert paid["properties"]["type"]["const"] == "order.paid"
    assert (
        "EventAccepted" in schemas
        and "401" in doc["paths"]["/v1/webhooks/{source_id}"]["post"]["responses"]
    )


def test_background_workers_fire_timers_when_the_app_runs(engine, clock):
    app = app_for(engine, clock)
    client = Client(app)
    _, h = new_tenant(engine)
    client.put("/v1/funnels/welcome", json=welcome(), headers=h)
    Source(client, h, clock).send(event("member.joined", "wx-1"))
    clock.advance(timedelta(hours=1))

    async def run_briefly() -> None:
        async with app.router.lifespan_context(app):
            for _ in range(100):
                await asyncio.sleep(0.05)
                if app.state.workers.totals.timers_fired:
                    return

    asyncio.run(run_briefly())
    assert app.state.workers.totals.timers_fired == 1


def test_the_started_service_keeps_its_startup_heap_out_of_full_collections(engine, clock):
    """(app/heap.py: full collections over it stalled every request in flight.)"""
    app = app_for(engine, clock)
    gc.unfreeze()

    async def start() -> int:
        async with app.router.lifespan_context(app):
            return gc.get_freeze_count()

    assert asyncio.run(start()) > 10_000  # modules, routes, validators, tables


def test_pruning_forgets_idempotency_keys_after_the_retention(client, engine, clock):
    _, h = new_tenant(engine)
    client.put("/v1/funnels/welcome", json=welcome(), headers=h)
    source = Source(client, h, clock)
    first = source.send(event("member.joined", "wx-1"), msg_id="msg_1")
    workers = client.app.state.workers
    assert workers.prune()["keys"] == 0
    clock.advance(timedelta(hours=71))
    source.send(event("member.joined", "wx-1"), msg_id="msg_1")  # within 72 h: replayed
    assert workers.prune()["keys"] == 0
    clock.advance(timedelta(hours=2))
    assert workers.prune() == {"keys": 1, "events": 0, "deliveries": 0}

    def rows() -> tuple[int, int]:
        with engine.connect() as conn:
            count = select(func.count())
            return (
                conn.execute(count.select_from(EventLog)).scalar_one(),
                conn.execute(count.select_from(EventResponse)).scalar_one(),
            )

    assert rows() == (1, 0)  # the event stays; its key and response are forgotten
    again = source.send(event("member.joined", "wx-1"), msg_id="msg_1")  # a new event now
    assert again.status_code == 200 and again.json()["event_id"] != first.json()["event_id"]
    assert rows() == (2, 1)
    clock.advance(timedelta(days=91))
    assert workers.prune()["events"] == 2
    assert rows() == (0, 0)  # the response went with its event


def test_json_logs_carry_the_request_id_and_no_bodies():
    record = logging.LogRecord(
        "flywheel.http", logging.INFO, __file__, 1, "POST %s 200", ("/x",), None
    )
    token = request_id.set("req-1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert (
        line["request_id"] == "req-1" and line["msg"] == "POST /x 200" and line["level"] == "info"
    )


def test_responses_carry_a_request_id(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc"})
    assert r.headers["x-request-id"] == "abc"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32
