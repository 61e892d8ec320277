"""Guards in CEL (the Common Expression Language) and message templates.

CEL is standard, side-effect free and not Turing complete; the Rust-backed
`common-expression-language` package evaluates a compiled guard in about 10 µs. Guards are
compiled once per funnel version and may read only the names in `ROOTS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cel

from app.engine.definition import MAX_EXPRESSION_CHARS

ROOTS = ("event", "member", "funnel", "state", "now")
# CEL has no loops, but a comprehension (all, exists, map…) inside another multiplies: two
# levels over a member's list of 100,000 items is 10^10 steps. One level keeps every guard
# linear in its input, which the body limit bounds.
MAX_MACRO_DEPTH = 1
_MACROS = r"(?:all|exists|exists_one|map|filter)"
_MACRO_OPEN = re.compile(rf"\.\s*{_MACROS}\s*\(")
_STRING = re.compile(r"'''.*?'''|\"\"\".*?\"\"\"|'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.DOTALL)
_MACRO_VARIABLE = re.compile(rf"\.\s*{_MACROS}\s*\(\s*([A-Za-z_]\w*)\s*,")
_TEMPLATE_FIELD = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


class GuardError(ValueError):
    """A guard that does not compile or reads something it may not."""


@dataclass(frozen=True)
class Guard:
    source: str
    program: Any  # cel.Program

    def evaluate(self, context: Mapping[str, Any]) -> tuple[bool, str | None]:
        """True when the guard holds. A guard that errors (a missing field, a type mismatch)
        does not hold, and the error is returned so a simulation can show it."""
        try:
            result = self.program.execute(dict(context))
        except Exception as exc:  # the CEL runtime raises KeyError, TypeError, ValueError…
            return False, f"{type(exc).__name__}: {exc}"
        if not isinstance(result, bool):
            return False, f"guard gave {type(result).__name__}, not a boolean"
        return result, None


def compile_guard(source: str) -> Guard:
    if len(source) > MAX_EXPRESSION_CHARS:
        raise GuardError(f"longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        program = cel.compile(source)
    except Exception as exc:
        raise GuardError(_first_cel_line(str(exc))) from exc
    if _macro_depth(source) > MAX_MACRO_DEPTH:
        raise GuardError(
            "a comprehension (all, exists, exists_one, map, filter) inside another; "
            "guards allow one level, so their cost stays linear in their input"
        )
    bound = set(_MACRO_VARIABLE.findall(source))
    unknown = sorted(set(program.variables()) - bound - set(ROOTS))
    if unknown:
        raise GuardError(
            f"unknown name{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"guards can read {', '.join(ROOTS)}"
        )
    return Guard(source, program)


def _macro_depth(source: str) -> int:
    """How deeply comprehension macros nest in `source` (string literals skipped)."""
    code = _STRING.sub('""', source)
    opens = {m.end() - 1 for m in _MACRO_OPEN.finditer(code)}  # where each macro's "(" is
    stack: list[bool] = []  # per open parenthesis: does it open a macro?
    depth = deepest = 0
    for i, ch in enumerate(code):
        if ch == "(":
            is_macro = i in opens
            stack.append(is_macro)
            depth += is_macro
            deepest = max(deepest, depth)
        elif ch == ")" and stack:
            depth -= stack.pop()
    return deepest


def _first_cel_line(message: str) -> str:
    # "Failed to parse expression '…': ERROR: <input>:1:17: Syntax error: …\n| …"
    first = message.splitlines()[0]
    marker = "ERROR: <input>:"
    if marker in first:
        first = "syntax error at " + first.split(marker, 1)[1].strip()
    return first


def template_fields(template: str) -> list[str]:
    return [m.group(1) for m in _TEMPLATE_FIELD.finditer(template)]


def check_template(template: str) -> list[str]:
    """Problems with a message template's {{ fields }}."""
    problems = []
    for name in template_fields(template):
        if not _DOTTED.match(name):
            problems.append(f'"{{{{ {name} }}}}" is not a dotted name such as member.nickname')
        elif name.split(".", 1)[0] not in ROOTS:
            problems.append(
                f'"{{{{ {name} }}}}" reads unknown name "{name.split(".", 1)[0]}"; '
                f"templates can read {', '.join(ROOTS)}"
            )
    return problems


def render_template(template: str, context: Mapping[str, Any]) -> str:
    """Fill {{ dotted.names }} from the context; a missing value renders as empty text."""
    parts = _parsed(template)
    if len(parts) == 1:
        return template  # no fields
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(part)
            continue
        node: Any = context
        for name in part:
            if isinstance(node, Mapping) and name in node:
                node = node[name]
            else:
                node = None
                break
        if node is not None:
            out.append(str(node))
    return "".join(out)


@lru_cache(maxsize=1024)
def _parsed(template: str) -> tuple[Any, ...]:
    """The template split once (a funnel's few templates render on every step): literal
    text, then each field's dotted path, alternately."""
    parts: list[Any] = []
    at = 0
    for match in _TEMPLATE_FIELD.finditer(template):
        parts.append(template[at : match.start()])
        parts.append(tuple(match.group(1).split(".")))
        at = match.end()
    parts.append(template[at:])
    return tuple(parts)
