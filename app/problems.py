"""RFC 9457 problem details: the one error shape every endpoint answers with.

`{type, title, status, detail, instance, code, errors: [{path, message}]}` with the media type
`application/problem+json`. Domain errors carry their own code and status; request validation
failures list each field at fault by its JSON path.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from app.engine.paths import pydantic_loc_to_path
from app.errors import DomainError, FieldProblem

log = logging.getLogger("flywheel")
PROBLEM_TYPE = "https://flywheel.example/problems/"
MEDIA_TYPE = "application/problem+json"


class ProblemError(BaseModel):
    path: str
    message: str


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    instance: str
    code: str
    errors: list[ProblemError] = []


def problem_body(
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str,
    errors: list[FieldProblem] | None = None,
) -> dict[str, Any]:
    return {
        "type": PROBLEM_TYPE + code.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        "code": code,
        "errors": [{"path": e.path, "message": e.message} for e in errors or []],
    }


Parts = tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]  # status, media type, body, headers


def problem_of(exc: DomainError, instance: str) -> Parts:
    """A domain error as raw ASGI parts (status, media type, body, headers), for the
    fast paths that answer without FastAPI; the same document `install` renders."""
    headers = _headers_of(exc)
    body = problem_body(exc.status, exc.code, exc.title, exc.detail, instance, exc.errors)
    return (
        exc.status,
        MEDIA_TYPE.encode(),
        orjson.dumps(body),
        [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
    )


async def send_raw(
    send: Send, status: int, media_type: bytes, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Answer on the raw ASGI channel (`Parts`, or a fast path's own reply)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", media_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _headers_of(exc: DomainError) -> dict[str, str]:
    headers = dict(exc.headers)
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return headers


def database_unavailable(exc: OperationalError, instance: str) -> Parts:
    log.warning("database unavailable on %s: %s", instance, exc.orig)
    body = problem_body(503, "database_unavailable", "Database unavailable", _DB_DOWN, instance)
    return 503, MEDIA_TYPE.encode(), orjson.dumps(body), [(b"retry-after", b"2")]


_DB_DOWN = "the database could not be reached; retry shortly"


def problem_response(
    request: Request,
    status: int,
    code: str,
    title: str,
    detail: str,
    errors: list[FieldProblem] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = problem_body(status, code, title, detail, request.url.path, errors)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problems a route can answer with."""
    return {s: {"model": Problem, "content": {MEDIA_TYPE: {}}} for s in statuses}


# Answers any operation may give besides its own: a body that is not JSON or too large, and
# the database being unreachable.
_BODY_PROBLEMS = {
    "400": "The body is not valid JSON",
    "413": "The body is too large",
    "415": "The body is not sent as JSON",
}
_ANY_PROBLEMS = {"503": "The database is unavailable; retry later"}


def document(schema: dict[str, Any]) -> None:
    """Every error response in the OpenAPI as what it is on the wire: an RFC 9457 problem
    document (`application/problem+json`), including FastAPI's own 422, plus the problems
    any operation can answer with."""
    ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            answers = operation.setdefault("responses", {})
            extra = {**_ANY_PROBLEMS, **(_BODY_PROBLEMS if "requestBody" in operation else {})}
            if path.startswith("/v1/webhooks/"):  # read raw, whatever the content type
                extra.pop("415", None)
            if any(p["name"].lower() == "idempotency-key" for p in operation.get("parameters", [])):
                extra["409"] = "The Idempotency-Key was used before with other parameters"
            for code, description in extra.items():
                answers.setdefault(code, {"description": description})
            for code, answer in answers.items():
                if code[0] in "45":
                    answer["content"] = {MEDIA_TYPE: ref}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components.setdefault(
        "Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> JSONResponse:
        return problem_response(
            request, exc.status, exc.code, exc.title, exc.detail, exc.errors, _headers_of(exc)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for error in exc.errors():
            loc = list(error.get("loc", ()))
            where = loc.pop(0) if loc and loc[0] in ("body", "query", "path", "header") else "body"
            path = pydantic_loc_to_path(loc)
            prefix = "" if where == "body" else f"{where}:"
            errors.append(FieldProblem(prefix + path, str(error.get("msg", "invalid"))))
        return problem_response(
            request,
            422,
            "validation_failed",
            "Request validation failed",
            f"{len(errors)} problem(s) in the request",
            errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        return problem_response(
            request,
            exc.status_code,
            code,
            str(exc.detail),
            str(exc.detail),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError) -> JSONResponse:
        log.info("integrity conflict on %s: %s", request.url.path, exc.orig)
        return problem_response(
            request,
            409,
            "conflict",
            "Conflict",
            "a concurrent change conflicted with this one; retry",
        )

    @app.exception_handler(OperationalError)
    async def _db_down(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable on %s: %s", request.url.path, exc.orig)
        return problem_response(
            request,
            503,
            "database_unavailable",
            "Database unavailable",
            _DB_DOWN,
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(
            request,
            500,
            "internal_error",
            "Internal error",
            "an unexpected error occurred; it has been logged",
        )
