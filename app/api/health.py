from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from app.db import ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """Liveness and database reachability: 200 when the database answers, 503 when not."""
    backend = request.app.state.engine.dialect.name
    try:
        ping(request.app.state.engine)
    except SQLAlchemyError as exc:
        return JSONResponse(
            {"status": "unhealthy", "database": backend, "error": type(exc).__name__},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "database": backend})
