"""JSON paths for error messages, and a JSON loader that reports duplicate keys.

Paths read like the document: `transitions[3].to`, `states.paid.on_enter[0]`,
`states["odd key"]`. The empty path is the document itself.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from app.errors import FieldProblem

_PLAIN_KEY = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$-]*$")
_DUPLICATES = "\x00duplicate-keys"  # marker key; cannot appear in JSON text unescaped by users


def format_path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    duplicates: list[str] = []
    for key, value in pairs:
        if key in result and key not in duplicates:
            duplicates.append(key)
        result[key] = value
    if duplicates:
        result[_DUPLICATES] = duplicates
    return result


def _collect_duplicates(node: Any, path: list[str | int], out: list[FieldProblem]) -> Any:
    if isinstance(node, dict):
        dups = node.pop(_DUPLICATES, [])
        for key in dups:
            out.append(
                FieldProblem(
                    format_path([*path, key]),
                    f'duplicate key "{key}": only the last value would be kept',
                )
            )
        for key, value in node.items():
            _collect_duplicates(value, [*path, key], out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _collect_duplicates(value, [*path, i], out)
    return node


class JsonSyntaxError(ValueError):
    def __init__(self, problem: FieldProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def loads_checked(text: str | bytes) -> tuple[Any, list[FieldProblem]]:
    """Parse JSON text; return the document and one problem per duplicated key."""
    try:
        document = json.loads(text, object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as exc:
        raise JsonSyntaxError(
            FieldProblem("", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        ) from exc
    except UnicodeDecodeError as exc:
        raise JsonSyntaxError(FieldProblem("", f"not valid UTF-8: {exc.reason}")) from exc
    except RecursionError as exc:
        raise JsonSyntaxError(FieldProblem("", "JSON nested too deeply")) from exc
    problems: list[FieldProblem] = []
    _collect_duplicates(document, [], problems)
    return document, problems


def pydantic_loc_to_path(loc: Sequence[str | int]) -> str:
    """Turn a pydantic error location into a document path, dropping union tags."""
    parts: list[str | int] = []
    for item in loc:
        if isinstance(item, str) and (item.startswith("function-") or "[" in item):
            continue  # validator and union-member labels pydantic adds to locations
        parts.append(item)
    return format_path(parts)


def suggest(name: str, candidates: Collection[str], cutoff: float = 0.6) -> str:
    """'; did you mean "x"?' — or two names when two are equally close (payed: paid, placed)."""
    scored = sorted(
        ((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in candidates), reverse=True
    )
    close = [c for ratio, c in scored[:2] if ratio >= cutoff and ratio >= scored[0][0] - 0.05]
    if not close:
        return ""
    return "; did you mean " + " or ".join(f'"{c}"' for c in sorted(close)) + "?"
