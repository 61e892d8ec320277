"""Validate a funnel definition completely, then compile it once for `step`.

Validation reports every problem at once, each with the JSON path at fault and a sentence a
marketer can act on. Structural problems come from the pydantic models; when the structure
is sound, the semantic checks below run: references, reachability, final states, timers that
can never fire, guards that do not compile, unknown events and mechanics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from app.engine import definition as d
from app.engine.catalogue import BUILTIN_EVENTS
from app.engine.guards import Guard, GuardError, check_template, compile_guard
from app.engine.paths import (
    JsonSyntaxError,
    format_path,
    loads_checked,
    pydantic_loc_to_path,
    suggest,
)
from app.engine.schedule import (
    cron_ever_fires,
    days_of,
    parse_duration,
    parse_local_time,
)
from app.errors import FieldProblem, InvalidDefinition

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class CompiledTransition:
    index: int
    sources: tuple[str, ...]
    to: str
    trigger: str  # event | after | cron | at
    event: str | None
    after: timedelta | None
    cron: str | None
    at_time: time | None
    at_days: tuple[int, ...]
    guard: Guard | None
    actions: tuple[Any, ...]

    @property
    def timer_key(self) -> str:
        return f"t{self.index}"

    @property
    def path(self) -> str:
        return f"transitions[{self.index}]"


@dataclass(frozen=True)
class CompiledExit:
    index: int
    event: str
    guard: Guard | None
    actions: tuple[Any, ...]


@dataclass(frozen=True)
class CompiledFunnel:
    definition: d.FunnelDefinition
    version: int | None
    zone: ZoneInfo
    transitions: tuple[CompiledTransition, ...]
    on_event: dict[tuple[str, str], tuple[CompiledTransition, ...]]
    timers: dict[str, tuple[CompiledTransition, ...]]
    entry_guard: Guard | None
    exits: tuple[CompiledExit, ...]
    known_events: frozenset[str]
    quiet_hours: tuple[time, time] | None
    max_messages_per_day: int | None
    by_timer_key: dict[str, CompiledTransition] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.definition.key

    @property
    def campaign(self) -> str:
        return self.definition.campaign or f"v{self.version or 0}"

    def stage_of(self, state: str) -> str:
        return self.definition.states[state].stage

    def is_final(self, state: str) -> bool:
        return self.definition.states[state].final


# ── entry points ───────────────────────────────────────────────────────────────────────────
def load_and_compile(text: str | bytes, *, version: int | None = None) -> CompiledFunnel:
    """Parse JSON text (duplicate keys are problems too), validate and compile."""
    try:
        document, duplicates = loads_checked(text)
    except JsonSyntaxError as exc:
        raise InvalidDefinition([exc.problem]) from exc
    return compile_document(document, version=version, extra_problems=duplicates)


def compile_document(
    document: Any, *, version: int | None = None, extra_problems: list[FieldProblem] | None = None
) -> CompiledFunnel:
    problems = list(extra_problems or [])
    funnel = parse_definition(document, problems)
    if funnel is None:
        raise InvalidDefinition(problems)
    return compile_funnel(funnel, version=version, extra_problems=problems)


def parse_definition(document: Any, problems: list[FieldProblem]) -> d.FunnelDefinition | None:
    """The structural pass: pydantic validation, every error turned into a path and a sentence."""
    if not isinstance(document, dict):
        problems.append(FieldProblem("", "a funnel definition is a JSON object"))
        return None
    try:
        return d.FunnelDefinition.model_validate(document)
    except ValidationError as exc:
        seen: set[str] = set()
        for error in exc.errors(include_url=False):
            path = pydantic_loc_to_path(error["loc"])
            if path in seen:
                continue  # a union reports once per member; the first says enough
            seen.add(path)
            problems.append(FieldProblem(path, _explain(error)))
        return None


def compile_funnel(
    funnel: d.FunnelDefinition,
    *,
    version: int | None = None,
    extra_problems: list[FieldProblem] | None = None,
) -> CompiledFunnel:
    problems = list(extra_problems or [])
    guards = _compile_guards(funnel, problems)
    problems.extend(semantic_problems(funnel))
    if problems:
        raise InvalidDefinition(problems)

    compiled = []
    for i, t in enumerate(funnel.transitions):
        at_time = parse_local_time(t.at.time) if t.at else None
        compiled.append(
            CompiledTransition(
                index=i,
                sources=tuple(t.sources),
                to=t.to,
                trigger=t.trigger,
                event=t.event,
                after=parse_duration(t.after) if t.after else None,
                cron=t.cron,
                at_time=at_time,
                at_days=days_of(t.at.days) if t.at else (),
                guard=guards.get(("transitions", i)),
                actions=tuple(t.actions),
            )
        )
    on_event: dict[tuple[str, str], list[CompiledTransition]] = defaultdict(list)
    timers: dict[str, list[CompiledTransition]] = defaultdict(list)
    for ct in compiled:
        for source in ct.sources:
            if ct.event:
                on_event[(source, ct.event)].append(ct)
            else:
                timers[source].append(ct)
    quiet = funnel.policy.quiet_hours
    return CompiledFunnel(
        definition=funnel,
        version=version,
        zone=ZoneInfo(funnel.timezone),
        transitions=tuple(compiled),
        on_event={k: tuple(v) for k, v in on_event.items()},
        timers={k: tuple(v) for k, v in timers.items()},
        entry_guard=guards.get(("entry",)),
        exits=tuple(
            CompiledExit(i, x.event, guards.get(("exit", i)), tuple(x.actions))
            for i, x in enumerate(funnel.exit)
        ),
        known_events=frozenset(BUILTIN_EVENTS) | {c.name for c in funnel.custom_events},
        quiet_hours=(parse_local_time(quiet.start), parse_local_time(quiet.end)) if quiet else None,
        max_messages_per_day=funnel.policy.max_messages_per_day,
        by_timer_key={ct.timer_key: ct for ct in compiled if not ct.event},
    )


# ── messages ───────────────────────────────────────────────────────────────────────────────
@cache
def _known_keys() -> frozenset[str]:
    """Every key the language knows, for did-you-mean hints on unknown keys."""
    return frozenset(
        info.alias or name
        for model in d.Strict.__subclasses__()
        for name, info in model.model_fields.items()
    )


def _explain(error: Any) -> str:
    kind, msg = error["type"], error["msg"]
    loc = error["loc"]
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        return f'unknown key "{key}"' + suggest(key, _known_keys() - {key}, cutoff=0.7)
    if kind == "missing":
        return "required"
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return f"unknown action type {ctx.get('tag')}; expected one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return 'an action needs a "type"'
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return str(msg[:1].lower() + msg[1:])


# ── semantic checks ────────────────────────────────────────────────────────────────────────
def _compile_guards(funnel: d.FunnelDefinition, problems: list[FieldProblem]) -> dict[Path, Guard]:
    sources: list[tuple[Path, str | None]] = [(("entry",), funnel.entry.guard)]
    sources += [(("exit", i), x.guard) for i, x in enumerate(funnel.exit)]
    sources += [(("transitions", i), t.guard) for i, t in enumerate(funnel.transitions)]
    guards: dict[Path, Guard] = {}
    for path, source in sources:
        if source is None:
            continue
        try:
            guards[path] = compile_guard(source)
        except GuardError as exc:
            problems.append(
                FieldProblem(format_path([*path, "guard"]), f"guard does not compile: {exc}")
            )
    return guards


def iter_actions(funnel: d.FunnelDefinition) -> Iterator[tuple[Path, Any]]:
    for name, state in funnel.states.items():
        for i, a in enumerate(state.on_enter):
            yield ("states", name, "on_enter", i), a
    for ti, t in enumerate(funnel.transitions):
        for i, a in enumerate(t.actions):
            yield ("transitions", ti, "actions", i), a
    for xi, x in enumerate(funnel.exit):
        for i, a in enumerate(x.actions):
            yield ("exit", xi, "actions", i), a


def semantic_problems(funnel: d.FunnelDefinition) -> list[FieldProblem]:
    out: list[FieldProblem] = []

    def add(path: Path, message: str) -> None:
        out.append(FieldProblem(format_path(path), message))

    states = funnel.states
    names = set(states)
    if funnel.initial not in names:
        add(("initial",), f'no state named "{funnel.initial}"{suggest(funnel.initial, names)}')

    # events
    builtin = set(BUILTIN_EVENTS)
    custom: set[str] = set()
    for i, ce in enumerate(funnel.custom_events):
        if ce.name in builtin:
            add(
                ("custom_events", i, "name"),
                f'"{ce.name}" is a built-in event; do not redeclare it',
            )
        elif ce.name in custom:
            add(("custom_events", i, "name"), f'"{ce.name}" is declared twice')
        custom.add(ce.name)
    known = builtin | custom

    def check_event(path: Path, name: str) -> None:
        if name not in known:
            add(
                path,
                f'unknown event "{name}"{suggest(name, known)}; declare custom events '
                "in custom_events",
            )

    for i, name in enumerate(funnel.entry.events):
        check_event(("entry", "events", i), name)
    for i, x in enumerate(funnel.exit):
        check_event(("exit", i, "event"), x.event)
    for name, ref in funnel.mechanics.referral.items():
        check_event(("mechanics", "referral", name, "qualify_event"), ref.qualify_event)

    # transitions: references, finals, shadowing
    for i, t in enumerate(funnel.transitions):
        for j, source in enumerate(t.sources):
            path: Path = ("transitions", i, "from") + ((j,) if isinstance(t.from_, list) else ())
            if source not in names:
                add(path, f'no state named "{source}"{suggest(source, names)}')
            elif states[source].final:
                add(path, f'"{source}" is a final state; no transition can leave it')
        if t.to not in names:
            add(("transitions", i, "to"), f'no state named "{t.to}"{suggest(t.to, names)}')
        if t.event:
            check_event(("transitions", i, "event"), t.event)
        if t.cron and not cron_ever_fires(
            t.cron, datetime(2026, 1, 1, tzinfo=UTC), ZoneInfo(funnel.timezone)
        ):
            add(("transitions", i, "cron"), f'"{t.cron}" never fires (no such date)')
    out.extend(_shadowed(funnel))

    # reachability from the initial state
    if funnel.initial in names:
        reached = {funnel.initial}
        frontier = [funnel.initial]
        while frontier:
            here = frontier.pop()
            for t in funnel.transitions:
                if here in t.sources and t.to in names and t.to not in reached:
                    reached.add(t.to)
                    frontier.append(t.to)
        for name in states:
            if name not in reached:
                add(
                    ("states", name),
                    f'"{name}" cannot be reached from the initial state "{funnel.initial}"',
                )

    # actions: templates and mechanic references
    mechanics = funnel.mechanics.names()
    for path, action in iter_actions(funnel):
        if isinstance(action, d.SendMessage):
            for message in check_template(action.template):
                add((*path, "template"), message)
        target: str | None = getattr(action, "mechanic", None)
        if target and target not in mechanics:
            add(
                (*path, "mechanic"),
                f'no mechanic named "{target}"{suggest(target, mechanics)}'
                + ("" if mechanics else "; the mechanics section is empty"),
            )

    # migrations
    seen_versions: set[int] = set()
    for i, m in enumerate(funnel.migrations):
        if m.from_version in seen_versions:
            add(("migrations", i, "from_version"), f"version {m.from_version} is mapped twice")
        seen_versions.add(m.from_version)
        for old, new in m.states.items():
            if new not in names:
                add(
                    ("migrations", i, "states", old),
                    f'no state named "{new}"{suggest(new, names)}',
                )
    return out


def _shadowed(funnel: d.FunnelDefinition) -> list[FieldProblem]:
    """Transitions that can never fire: in every state they leave, an earlier unguarded
    transition on the same event, or an unguarded timer that fires no later, always wins."""
    out = []
    for i, t in enumerate(funnel.transitions):
        if t.trigger not in ("event", "after") or not t.sources:
            continue
        reasons = []
        for source in t.sources:
            winner = _winner_before(funnel, i, source)
            if winner is None:
                break
            reasons.append(f'from "{source}" transitions[{winner}] always fires first')
        else:
            kind = "event" if t.event else "after"
            out.append(
                FieldProblem(
                    format_path(("transitions", i, kind)), "never fires: " + "; ".join(reasons)
                )
            )
    return out


def _winner_before(funnel: d.FunnelDefinition, i: int, source: str) -> int | None:
    t = funnel.transitions[i]
    for j, u in enumerate(funnel.transitions):
        if j == i or u.guard is not None or source not in u.sources:
            continue
        if t.event and u.event == t.event and j < i:
            return j
        if t.after and u.after:
            mine, theirs = parse_duration(t.after), parse_duration(u.after)
            if theirs < mine or (theirs == mine and j < i):
                return j
    return None
