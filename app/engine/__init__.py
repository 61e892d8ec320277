"""The pure funnel engine: definition language, compiler and `step`.

Nothing in this package does I/O or reads a clock; an import contract (import-linter,
run by `make test`) forbids web, database and network imports here.
"""

from app.engine.compiler import CompiledFunnel, compile_document, compile_funnel, load_and_compile
from app.engine.step import Event, MemberState, Outcome, step

__all__ = [
    "CompiledFunnel",
    "Event",
    "MemberState",
    "Outcome",
    "compile_document",
    "compile_funnel",
    "load_and_compile",
    "step",
]
