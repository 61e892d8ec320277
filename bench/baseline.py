"""The benchmark's baseline: a bare FastAPI endpoint that parses the same JSON and returns it,
served by the same uvicorn configuration as Flywheel."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

app = FastAPI()


@app.post("/v1/webhooks/{source}")
async def echo(source: str, request: Request) -> Any:
    return await request.json()
