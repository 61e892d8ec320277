"""Domain errors: a stable code and an HTTP status, no web framework import.

`app.problems` renders them as RFC 9457 problem details at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldProblem:
    """One problem at one place in a document: `transitions[3].to`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class DomainError(Exception):
    status: int = 400
    code: str = "bad_request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[FieldProblem] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled whole (the writer process answers with these): subclasses take other
        # arguments than their `args`, and the code, errors and headers live on the instance.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[DomainError], args: tuple[Any, ...], state: dict[str, Any]) -> DomainError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class NotFound(DomainError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(DomainError):
    status, code, title = 409, "conflict", "Conflict"


class Refused(Conflict):
    """An operation on a mechanic that cannot happen, with `code` naming why (`team_full`,
    `sold_out`, `voucher_already_redeemed`…): a 409 a client can branch on."""

    def __init__(self, reason: str, detail: str, errors: list[FieldProblem] | None = None) -> None:
        super().__init__(detail, errors=errors)
        self.code = reason


class Unauthorized(DomainError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class InvalidDefinition(DomainError):
    """A funnel definition failed validation; every problem found is listed."""

    status, code, title = 422, "invalid_funnel", "Invalid funnel definition"

    def __init__(self, problems: list[FieldProblem]) -> None:
        n = len(problems)
        shown = "; ".join(str(p) for p in problems[:3]) + (" …" if n > 3 else "")
        super().__init__(
            f"The funnel definition has {n} problem{'s' if n != 1 else ''}: {shown}",
            errors=problems,
        )
        self.problems = problems


class VersionArchived(DomainError):
    status, code, title = 409, "version_archived", "Funnel version archived"


class BodyTooLarge(DomainError):
    status, code, title = 413, "body_too_large", "Body too large"


class UnsupportedMediaType(DomainError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class TooManyRequests(DomainError):
    status, code, title = 429, "rate_limited", "Too many requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class InvalidQuery(DomainError):
    """A report's parameters cannot be answered (a range that ends before it starts, an
    unknown stage); `errors` names the parameter, `query:from`."""

    status, code, title = 422, "invalid_query", "Invalid query"
