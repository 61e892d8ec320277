"""Database engines and sessions.

SQLite (the embedded default) gets WAL, foreign keys, a busy timeout and `BEGIN IMMEDIATE`
for every transaction: with Python's default deferred BEGIN, two read-then-write
transactions race and one fails with "database is locked" despite the busy timeout (see
ARCHITECTURE.md). PostgreSQL gets a connection pool that pings a connection idle for a
second or more before handing it out, so a restarted server is reconnected to without
restarting the service.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Integer,
    MetaData,
    Table,
    Text,
    any_,
    bindparam,
    cast,
    column,
    create_engine,
    event,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlmodel import Session, SQLModel

from app.turn import turn_for

ROWS = "rows"  # the parameter of `unnested`

if TYPE_CHECKING:
    from app.config import Settings

# Stable constraint names, so migrations can alter them on every backend (before any table).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
READ_ONLY = "flywheel_read_only"
# The dispatcher's writer marks its connection so: on SQLite it gives way to other writers
# before each batch (app/turn.py).
GIVES_WAY = "flywheel_gives_way"
_ASKED = "flywheel_asked_turn"
log = logging.getLogger("flywheel.db")
metadata: MetaData = SQLModel.metadata


def insert_or_skip(table: Table, keys: Sequence[str], returning: Any = None) -> dict[str, Any]:
    """`INSERT … ON CONFLICT (keys) DO NOTHING [RETURNING returning]`, built once for each
    dialect (both have it); execute `stmt[conn.dialect.name]`. A row that was skipped returns
    nothing, which is how callers tell "made it" from "it was there": rowcount is not reliable
    for this on every driver."""
    out: dict[str, Any] = {}
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite)):
        stmt = dialect.insert(table).on_conflict_do_nothing(index_elements=list(keys))
        out[name] = stmt.returning(returning) if returning is not None else stmt
    return out


def _adding(stmt: Any, table: Table, keys: Sequence[str], counters: Sequence[str]) -> Any:
    return stmt.on_conflict_do_update(
        index_elements=list(keys), set_={c: table.c[c] + stmt.excluded[c] for c in counters}
    )


def insert_or_add(table: Table, keys: Sequence[str], counters: Sequence[str]) -> dict[str, Any]:
    """`INSERT … ON CONFLICT (keys) DO UPDATE SET c = c + excluded.c` for each of `counters`,
    built once for each dialect; execute `stmt[conn.dialect.name]`. Counts kept by adding,
    several rows in one statement."""
    return {
        name: _adding(dialect.insert(table), table, keys, counters)
        for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
    }


def add_rows(table: Table, keys: Sequence[str], counters: Sequence[str], param: str = ROWS) -> Any:
    """PostgreSQL's `insert_or_add` over rows bound as one parameter (`insert_rows`)."""
    return _adding(insert_rows(table, [*keys, *counters], param), table, keys, counters)


def unnested(columns: Mapping[str, Any], param: str = ROWS) -> Any:
    """PostgreSQL's `json_to_recordset(:rows) AS rows(a type, b type, …)`: a batch's rows
    bound as one parameter, a JSON array of objects (`app.prepared.Many` makes it with
    orjson), each key read as the named column's type, for one statement over them all.
    Select from it, join it, take `rows.c.<key>`. (Arrays, one per column through `unnest`,
    cost more: psycopg dumps each array's items in Python, slower than executemany.)
    `param`: the parameter's name, and the rows' (two sets of rows in one statement).

    The rows are limited to their own number, bound beside them (`counted`, which
    `app.prepared.as_one` calls): the planner takes a function's rows to be 100, and joined
    to a table of some thousands of rows (closing the stages of a batch's members by their
    instance, dropping their timers) that estimate chose to read the whole table into a
    hash; told how many there are (a custom plan) or a few (a generic plan: a tenth of
    100), it looks each one up by its index. Measured in the join bench: closing a batch's
    15 stages 1.5 ms -> ~0.1 ms of the server's time."""
    source = func.json_to_recordset(cast(bindparam(param, type_=Text), postgresql.JSON))
    typed = [column(name, c.type) for name, c in columns.items()]
    rows = source.table_valued(*typed).render_derived(name=param, with_types=True)
    return select(*rows.c).limit(bindparam(counted(param), type_=Integer)).subquery(param)


def counted(param: str = ROWS) -> str:
    """The parameter that binds the number of `unnested` rows bound as `param`."""
    return f"{param}_n"


def insert_rows(table: Table, names: Sequence[str], param: str = ROWS) -> Any:
    """PostgreSQL's `INSERT INTO table (names) SELECT … FROM json_to_recordset(…)`, the rows'
    keys the columns' names (`unnested`): add `.on_conflict_…` as for a plain insert."""
    rows = unnested({n: table.c[n] for n in names}, param)
    return postgresql.insert(table).from_select(list(names), select(*rows.c))


def next_id_sql(table: str) -> str:
    """PostgreSQL: the SQL of the next id of `table`'s own sequence. The sequence is looked
    up once per statement (an InitPlan), not once per row: `pg_get_serial_sequence` searches
    the catalogue and its text is parsed into a relation each time it is evaluated, ~3 µs of
    the server's CPU a row, against ~0.3 µs for `nextval` itself."""
    return f"nextval((SELECT pg_get_serial_sequence('{table}', 'id')::regclass))"


def insert_numbered(table: Table, names: Sequence[str], keys: Sequence[str]) -> Any:
    """PostgreSQL's `insert_rows` for rows that take their ids from the table's sequence and
    may conflict on `keys` (skipped, as `insert_or_skip`): one statement that answers, for
    each row in the order given, `(id, made)`. The ids are drawn in that order, before the
    insert, so a skipped row's id is known too (and never used). One round trip where
    drawing the ids first and inserting then took two."""
    dialect: Any = postgresql.dialect()  # type: ignore[no-untyped-call]
    typed = ", ".join(f"{n} {table.c[n].type.compile(dialect=dialect)}" for n in names)
    listed = ", ".join(names)
    return text(
        "WITH given AS MATERIALIZED ("  # noqa: S608 - the table's own names, no input
        f" SELECT {next_id_sql(table.name)} AS id, r.*"
        f" FROM ROWS FROM (json_to_recordset(CAST(:{ROWS} AS JSON)) AS ({typed}))"
        f" WITH ORDINALITY AS r({listed}, position)),"
        f" made AS (INSERT INTO {table.name} (id, {listed}) SELECT id, {listed} FROM given"
        f" ON CONFLICT ({', '.join(keys)}) DO NOTHING RETURNING id)"
        " SELECT given.id, made.id IS NOT NULL FROM given LEFT JOIN made ON made.id = given.id"
        " ORDER BY given.position"
    ).bindparams(bindparam(ROWS, type_=Text))


def one_of(column: Any, name: str) -> dict[str, Any]:
    """`column` is one of the list bound to `name`, for each dialect, with the list bound as
    one value: the statement's text is the same however long the list, so it can be
    Prepared (an expanding IN is compiled again for each length, through SQLAlchemy's
    execute: ~60 µs a statement). `= ANY(array)` on PostgreSQL, `IN (SELECT value FROM
    json_each(…))` on SQLite; both use the column's index."""
    listed: Any = select(literal_column("value")).select_from(
        func.json_each(bindparam(name, type_=JSON))
    )
    return {
        "postgresql": column == any_(bindparam(name, type_=postgresql.ARRAY(column.type))),
        "sqlite": column.in_(listed.scalar_subquery()),
    }


def row_json(row: Any, drop: Sequence[str] = ("tenant_id",)) -> dict[str, Any]:
    """A row as JSON-ready values: its columns but `drop`, dates and times in ISO 8601."""
    return {
        k: v.isoformat() if isinstance(v, date) else v
        for k, v in row._mapping.items()
        if k not in drop
    }


metadata.naming_convention = NAMING_CONVENTION


def in_memory(url: str) -> bool:
    """A database that lives only in this process's memory (SQLite's `:memory:`)."""
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def engine_for(settings: Settings) -> Engine:
    """The service's engine as its settings configure it (the service's own process and
    each writer process open theirs with this)."""
    return make_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        busy_timeout_ms=settings.sqlite_busy_timeout_ms,
    )


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 10,
    busy_timeout_ms: int = 5000,
    echo: bool = False,
) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not in_memory(url):
            Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=echo,
            connect_args={
                "check_same_thread": False,
                "timeout": busy_timeout_ms / 1000,
                # A batch runs more distinct statements than sqlite3's default cache (128)
                # comfortably holds; one that falls out is parsed again on its next use.
                "cached_statements": 1024,
            },
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
        )
        _configure_sqlite(engine, busy_timeout_ms, None if in_memory(url) else parsed.database)
        return engine
    engine = create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=1800,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )
    _ping_when_idle(engine, PING_AFTER_IDLE_S)
    return engine


PING_AFTER_IDLE_S = 1.0
_IDLE_SINCE = "flywheel.idle_since"
_monotonic = time.monotonic  # (tests move it)


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Ping a pooled connection before handing it out if it sat idle `idle_s` or longer;
    one that fails is replaced (the pool retries the checkout on `DisconnectionError`).

    SQLAlchemy's `pool_pre_ping` pings at every checkout: a round trip before each of the
    writer's batches (9% of a writer's samples in the webhook bench) for a connection it
    used a few milliseconds before. Connections die while idle (a restarted server, a
    firewall's or `idle_session_timeout`'s cut); one in steady use that dies mid-flight
    fails its transaction, which callers answer 503 (a retry is safe), and SQLAlchemy then
    drops the pool's other connections of that age, as it does on any disconnect."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = _monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or _monotonic() - since < idle_s:
            return  # new, or in use a moment ago
        try:
            alive = engine.dialect._do_ping_w_event(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"ping failed: {exc}") from exc
        if not alive:
            raise DisconnectionError("the connection was closed while idle")


def _json_dumps(value: Any) -> str:
    """JSON columns through orjson: reading a solitaire list's lines spent most of its time
    in the standard library's decoder. Non-string keys become strings, as json.dumps does."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _configure_sqlite(engine: Engine, busy_timeout_ms: int, database: str | None) -> None:
    turn = turn_for(database) if database else None  # one connection in memory: no turns

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # A connection's own checkpoint (at commit, past this many pages: ~40 MB of WAL
        # rather than SQLite's 4 MB) is the backstop; the service copies the WAL from a
        # thread of its own (`WalCheckpointer`), so the writer finds little left to copy.
        # The write path rewrites the same hot pages batch after batch, and a page is copied
        # once per checkpoint however often it changed. The WAL file is cut back to 64 MB.
        cursor.execute("PRAGMA wal_autocheckpoint=10000")
        cursor.execute("PRAGMA journal_size_limit=67108864")
        # Each event runs under a SAVEPOINT, and SQLite keeps a savepoint's undo pages in a
        # statement journal: a temporary file by default, written with a pwrite for every
        # page an event first touches (about a third of the time the join path spent inside
        # SQLite). In memory it costs no system call; it holds one event's pages at a time.
        cursor.execute("PRAGMA temp_store=MEMORY")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        options = conn.get_execution_options()
        if options.get(READ_ONLY, False):
            # Readers take a deferred BEGIN: in WAL mode they never wait for the writer,
            # and the writer never waits for them.
            conn.exec_driver_sql("BEGIN")
            return
        if turn is not None:
            if options.get(GIVES_WAY, False):
                turn.give_way()
            else:
                turn.ask()
                conn.info[_ASKED] = turn
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _end_turn(conn.info)
            raise

    # An ask lasts until the transaction ends: committed, rolled back, or its connection
    # returned to the pool with the transaction still open (the pool rolls it back).
    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _on_end(conn: Any) -> None:
        _end_turn(conn.info)

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        _end_turn(record.info)


def _end_turn(info: dict[str, Any]) -> None:
    turn = info.pop(_ASKED, None)
    if turn is not None:
        turn.done()


class WalCheckpointer:
    """Copies a SQLite database's WAL into the database file from a thread of its own.

    Left to itself, the connection whose commit pushes the WAL past `wal_autocheckpoint`
    copies it there and then, before its commit returns: under sustained writes that was
    the writer, which stopped for each ~40 MB of WAL (under 10 s of webhooks, every ~1.5 s)
    while every caller in its next batches waited. Here a PASSIVE checkpoint runs every
    `interval` seconds on a connection of its own (0.2 s: ~1,400 pages, 20–30 ms of copying
    each, measured under that load; webhooks' p99 went from 93–109 ms to 44–53 ms, against
    33–43 ms with no checkpoint at all, and 1.0 s left it at 70–88 ms): it takes no write
    lock and waits for nobody, and sqlite3 releases the GIL while it copies, so the writer
    goes on committing, and starts the WAL over once a checkpoint has caught up with it.
    The writer's own checkpoint stays as the backstop, should this thread fall behind."""

    def __init__(self, url: str, interval: float) -> None:
        self.path, self.interval = str(make_url(url).database), interval
        # mode=rw: a database that is not there yet is not made here
        self._uri = Path(self.path).resolve().as_uri() + "?mode=rw"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="flywheel-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        failing = False
        while not self._stop.wait(self.interval):
            try:
                conn = conn or sqlite3.connect(self._uri, uri=True, isolation_level=None)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                if not failing:  # said once, not every interval; the writer's checkpoint
                    log.warning("WAL checkpoint failed: %s", exc)  # still copies the WAL
                failing = True
                if conn is not None:
                    conn.close()
                conn = None
            else:
                failing = False
        if conn is not None:
            conn.close()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One unit of work: commits on success, rolls back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A connection for reads only (no write lock on SQLite). One snapshot for all its
    statements: SQLite's read transaction is one, and PostgreSQL's REPEATABLE READ gives one
    (a report reads the roll-up and the pairs in several statements while a worker moves
    pairs from one to the other)."""
    with engine.connect() as conn:
        conn.execution_options(**{READ_ONLY: True})
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


T = TypeVar("T")
_MEMO = "flywheel_transaction_memo"


def once_per_transaction(conn: Connection, key: Hashable, load: Callable[[], T]) -> T:
    """`load()`, run once per key in the connection's current transaction: for rows the
    write path reads for every event but only other transactions change (a chat group's
    settings, a stored version). The connection's `info` outlives checkouts, so the memo is
    tied to the transaction."""
    transaction = conn.get_transaction()
    held = conn.info.get(_MEMO)
    if held is None or held[0] is not transaction:
        held = conn.info[_MEMO] = (transaction, {})
    memo: dict[Hashable, Any] = held[1]
    if key not in memo:
        memo[key] = load()
    hit: T = memo[key]
    return hit


def ping(engine: Engine) -> None:
    with read_connection(engine) as conn:
        conn.execute(text("SELECT 1"))
