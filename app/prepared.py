"""Hot-path statements run on the driver's cursor, compiled by SQLAlchemy once.

`Connection.execute` costs about 60 µs per statement before the database sees it (cache key,
execution context, result object); the same UPDATE on sqlite3's cursor costs 5 µs. An event
writes ten or more rows: in the webhook bench that overhead was about a third of the
writer thread's time. `Prepared` keeps what SQLAlchemy is good at (the SQL text for each
dialect, the types' bind processors: UTC datetimes, JSON through orjson) and drops the
per-call machinery:

    _TAKE_SEAT = Prepared(update(team_t).where(...).values(...))
    _TAKE_SEAT.run(conn, {"b_id": 1, ...})          # rowcount
    _TAKE_SEAT.scalar(conn, {...})                  # RETURNING id: the first column
    _FIRSTS.rows(conn, {...})                       # a SELECT of plain columns: tuples
    _TAKE_SEAT.run_many(conn, [{...}, {...}])       # executemany
    _TEAM.records(conn, {"b_id": 7})                # rows by attribute, values as SQLAlchemy's

What it does not do, so that callers cannot get it silently wrong: expanding IN lists and
Python-side defaults computed by a function are refused when the statement is compiled
(use `Connection.execute` for IN lists; pass such values). `rows` and `scalar` hand back the
driver's raw values (for ids, counts, text); `records` and `record` run each column's result
processor, the one `Connection.execute` would (SQLite's datetimes parsed and made UTC-aware,
JSON decoded), and answer rows whose columns are attributes, like SQLAlchemy's.

Errors are SQLAlchemy's (`DBAPIError.instance` picks IntegrityError, OperationalError… as
`Connection.execute` would), and `before_cursor_execute` listeners still see every statement
(tests count statements per event with one).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, DateTime
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

from app.db import ROWS, counted

Params = Mapping[str, Any]


@dataclass(frozen=True)
class _Plan:
    sql: str
    names: tuple[str, ...]  # bind names, in the order a positional driver wants them
    positional: bool
    fixed: dict[str, Any]  # values compiled into the statement (`.values(status="open")`)
    processors: dict[str, Callable[[Any], Any]]

    def args(self, params: Params) -> Any:
        out = []
        fixed, processors = self.fixed, self.processors
        for name in self.names:
            value = params[name] if name in params else fixed[name]
            proc = processors.get(name)
            out.append(proc(value) if proc is not None else value)
        return tuple(out) if self.positional else dict(zip(self.names, out, strict=True))


def _record_class(keys: list[str]) -> Any:
    """A namedtuple of the columns, with `_mapping` as SQLAlchemy's rows have it."""
    base: Any = namedtuple("Record", keys)  # type: ignore[misc]  # keys known at run time
    return type("Record", (base,), {"__slots__": (), "_mapping": property(base._asdict)})


@dataclass(frozen=True)
class _Shape:
    row: Any  # a namedtuple class of the result's column keys
    processors: list[Callable[[Any], Any] | None]

    def make(self, raw: Sequence[Any]) -> Any:
        return self.row._make(
            [v if p is None else p(v) for p, v in zip(self.processors, raw, strict=True)]
        )


def _last_of(proc: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`proc` remembering its last answer. A batch binds the same `now` (one datetime object)
    to a dozen columns per event, and making a UTC datetime SQLite's text took a few µs each
    time; datetimes are immutable, so the same object always binds the same."""
    last: list[tuple[Any, Any]] = [(None, None)]  # one pair, swapped whole: thread-safe

    def bind(value: Any) -> Any:
        seen, out = last[0]
        if value is seen and value is not None:
            return out
        out = proc(value)
        last[0] = (value, out)
        return out

    return bind


_CURSOR = "flywheel.cursor"


def _cursor(fairy: Any) -> Any:
    """The connection's cursor for prepared statements, made once: every method reads its
    results before it returns, so one cursor serves them all (psycopg spends about 15 µs
    setting up each new cursor, a fifth of what a statement costs it)."""
    driver = fairy.driver_connection
    cursor = fairy.info.get(_CURSOR)
    if cursor is None or cursor.connection is not driver or getattr(cursor, "closed", False):
        cursor = fairy.info[_CURSOR] = driver.cursor()
    return cursor


class Prepared:
    """One statement (or one per dialect name, as `insert_or_skip` builds them)."""

    def __init__(self, statement: ClauseElement | Mapping[str, ClauseElement]) -> None:
        self._statements = statement
        self._plans: dict[tuple[str, frozenset[str]], _Plan] = {}
        self._shapes: dict[str, _Shape] = {}  # by dialect: how `records` builds a row

    def _statement(self, dialect_name: str) -> Any:
        s = self._statements
        return s[dialect_name] if isinstance(s, Mapping) else s

    def _plan(self, conn: Connection, keys: frozenset[str]) -> _Plan:
        dialect = conn.dialect
        plan = self._plans.get((dialect.name, keys))
        if plan is not None:
            return plan
        statement = self._statement(dialect.name)
        # An INSERT names its columns by the keys given; other statements bind by name.
        compiled: Any = statement.compile(
            dialect=dialect, column_keys=sorted(keys) if statement.is_insert else None
        )
        # Python-side column defaults: a constant is filled in as SQLAlchemy would; a
        # function of the row is not evaluated here, so the caller must pass its value.
        defaults = {}
        for column in (*compiled.insert_prefetch, *compiled.update_prefetch):
            default = column.default if column in compiled.insert_prefetch else column.onupdate
            if default is None or not default.is_scalar:
                raise TypeError(f"Prepared statements take every value: also pass {column.key}")
            defaults[column.key] = default.arg
        if any(b.expanding for b in compiled.binds.values()):
            raise TypeError("Prepared statements do not expand IN lists; use Connection.execute")
        names = (
            tuple(compiled.positiontup)
            if compiled.positional
            else tuple(dict.fromkeys(compiled.bind_names.values()))
        )
        binds = compiled.binds
        processors = {}
        for name in names:
            kind = binds[name].type
            proc = kind.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                processors[name] = _last_of(proc) if kind._type_affinity is DateTime else proc
        fixed = {n: binds[n].effective_value for n in names if not binds[n].required}
        fixed.update(defaults)
        plan = _Plan(str(compiled), names, compiled.positional, fixed, processors)
        self._plans[(dialect.name, keys)] = plan
        return plan

    def _execute(self, conn: Connection, params: Sequence[Params], many: bool) -> Any:
        plan = self._plan(conn, frozenset(params[0]))
        args = [plan.args(p) for p in params]
        fairy = conn.connection
        cursor = _cursor(fairy)
        listeners = conn.dispatch.before_cursor_execute
        if listeners:
            for fn in listeners:
                fn(conn, cursor, plan.sql, args if many else args[0], None, many)
        try:
            if many:
                cursor.executemany(plan.sql, args)
            else:
                cursor.execute(plan.sql, args[0])
        except conn.dialect.loaded_dbapi.Error as exc:
            lost = conn.dialect.is_disconnect(exc, fairy.dbapi_connection, cursor)
            if lost:
                conn.invalidate(exc)
            raise DBAPIError.instance(
                plan.sql,
                args,
                exc,
                conn.dialect.loaded_dbapi.Error,
                connection_invalidated=lost,
                dialect=conn.dialect,
                ismulti=many,
            ) from exc
        return cursor

    def run(self, conn: Connection, params: Params) -> int:
        """Execute once; the number of rows it changed."""
        return int(self._execute(conn, [params], many=False).rowcount)

    def run_many(self, conn: Connection, params: Sequence[Params]) -> None:
        """One executemany for every set of parameters (all with the same keys); one set is
        executed plainly. (psycopg runs an executemany in pipeline mode, entered and left
        for the call: for one row that cost 76 µs of the client's CPU against 41 for an
        execute. A funnel step's timers and report pairs are mostly one row.)"""
        if len(params) == 1:
            self._execute(conn, params, many=False)
        elif params:
            self._execute(conn, params, many=True)

    def rows(self, conn: Connection, params: Params) -> list[tuple[Any, ...]]:
        """Execute once; every row, as the driver's tuples (see the module docstring)."""
        return list(self._execute(conn, [params], many=False).fetchall())

    def records(self, conn: Connection, params: Params) -> list[Any]:
        """Execute once; every row, its values processed as `Connection.execute` would,
        its columns attributes (`row.id`, `row.created_at`)."""
        cursor, shape = self._shaped(conn, params)
        return [shape.make(r) for r in cursor.fetchall()]

    def record(self, conn: Connection, params: Params) -> Any | None:
        """The first of `records`, or None."""
        cursor, shape = self._shaped(conn, params)
        row = cursor.fetchone()
        return None if row is None else shape.make(row)

    def _shaped(self, conn: Connection, params: Params) -> tuple[Any, _Shape]:
        cursor = self._execute(conn, [params], many=False)
        shape = self._shapes.get(conn.dialect.name) or self._shape(conn, cursor)
        return cursor, shape

    def _shape(self, conn: Connection, cursor: Any) -> _Shape:
        dialect = conn.dialect
        compiled: Any = self._statement(dialect.name).compile(dialect=dialect)
        columns = compiled._result_columns  # (key, name, objects, type) per column
        keys = [c[0] for c in columns]  # as SQLAlchemy's rows name them (`id`, `id_1`)
        processors = [
            c[3].dialect_impl(dialect).result_processor(dialect, d[1])
            for c, d in zip(columns, cursor.description, strict=True)
        ]
        shape = self._shapes[dialect.name] = _Shape(_record_class(keys), processors)
        return shape

    def scalar(self, conn: Connection, params: Params) -> Any:
        """Execute once; the first column of the first row it returned, or None."""
        row = self._execute(conn, [params], many=False).fetchone()
        return None if row is None else row[0]


class Many:
    """Rows written together, as one statement on PostgreSQL.

    psycopg's executemany sends a Bind and an Execute per row, and spends about 25 µs of
    Python on each (dumping, queueing in its pipeline), and the server runs the statement
    once per row: for a batch's rows (its events' claims and responses, a run's counters)
    that was a third of the writer's CPU in the webhook bench. `postgresql` is the statement
    over the rows as one JSON parameter (`app.db.unnested`, `insert_rows`), made by orjson
    in C; on SQLite, whose driver loops in C in the same process, `sqlite` (one row's
    statement) runs as executemany. Rows are mappings with the same keys (the columns the
    PostgreSQL statement reads among them). Their datetimes must be aware (UTC), as the
    columns' own binding insists: JSON carries the offset, and SQLite's path checks."""

    def __init__(self, postgresql: ClauseElement, sqlite: ClauseElement) -> None:
        self._postgresql, self._sqlite = Prepared(postgresql), Prepared(sqlite)

    def run(self, conn: Connection, rows: Sequence[Params]) -> None:
        if not rows:
            return
        if conn.dialect.name == "postgresql":
            self._postgresql.run(conn, as_one(rows))
        else:
            self._sqlite.run_many(conn, rows)

    def returned(self, conn: Connection, rows: Sequence[Params]) -> list[tuple[Any, ...]] | None:
        """`run`, answering what PostgreSQL's statement returns (its RETURNING, as the
        driver's tuples); None on SQLite, whose executemany returns nothing."""
        if conn.dialect.name != "postgresql" or not rows:
            self.run(conn, rows)
            return None if rows else []
        return self._postgresql.rows(conn, as_one(rows))


def as_one(rows: Sequence[Params], param: str = ROWS) -> Params:
    """`Many`'s rows as the parameters PostgreSQL's statement reads: the rows, and their
    number (`app.db.unnested`)."""
    return {param: orjson.dumps(rows).decode(), counted(param): len(rows)}
