"""The write path in a process of its own, so the service uses two cores.

One uvicorn worker runs everything in one interpreter, and one interpreter runs Python on
one core at a time: the HTTP side (parsing, signatures, validation, routing) and the writer
(`apply_batch`) took turns on the same core while the machine's second core sat idle
(measured under the webhook benchmark: the server at 99% of one core, the machine at 53%
of two). SQLite has one writer anyway, so a second uvicorn worker only waits on its lock;
a writer process beside the HTTP process is what uses the second core.

`WriterProcess` is one lane of the dispatcher. Each request's task hands its event (with
the dispatcher's `now`) to the socket pair as soon as it has one, without waiting for the
last one's commit, and answers its caller when the process sends the reply back, after its
commit. Events handed over together go as one message: up to `COALESCE` of them, or
whatever the event loop's turn produced. The process applies with its own engine, merging
whatever arrived while it was busy into its next transaction: group commit happens here.
It is started with `spawn` (no inherited threads, sockets or connections) when the service
starts, and again on the next batch if it died; batches it had when it died are answered
503 (one may have committed: a retry with the same idempotency key answers the stored
response). When the service's process goes away, even by `kill -9`, the socket closes and
the writer exits after its current batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import pickle
import socket
import struct
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.events.dispatch import Inbound, Reply, apply_batch

log = logging.getLogger("flywheel.writer")
_HEADER = struct.Struct("!Q")  # each message: its length, then a pickle


class WriterLost(Exception):
    """The writer process exited (or could not be reached) while it had a batch."""


class WriterProcess:
    """A writer process and the socket to it; `apply` is `apply_batch` run there.

    The service's side is asyncio streams on the event loop (no thread between the request
    and the socket: a thread woken by a reply waited for the GIL behind the event loop).
    Events are sent as they come, without waiting for the last one's commit; the process
    merges whatever arrived while it was busy into its next transaction, so it never waits
    for the event loop to hand it work, and group commit still takes all that queued.

    "As they come" is a few at a time: an event waits for at most `COALESCE - 1` more, or
    for the end of the event loop's turn, and they go as one message (one pickle, one write
    on the socket, one answer back). One message per event spent 16-19% of the service's
    CPU in the webhook bench writing to the socket and pickling; waiting for the whole
    turn instead left the writer idle while the service parsed a burst of 64 requests."""

    pipelined = True
    COALESCE = 4

    def __init__(self, settings: Settings, name: str = "flywheel-writer") -> None:
        self.settings, self.name = settings, name
        self._process: Any = None
        self._socket: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        # What `apply` was handed and not sent yet, and the callers of each message sent,
        # in the order sent (answers come back in that order).
        self._pending: list[_Caller] = []
        self._waiting: deque[list[_Caller]] = deque()
        self._reading: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def open(self) -> None:
        """Start the process now (its imports take a second), not on the first batch."""
        if self._process is None or not self._process.is_alive():
            self._start()

    async def apply(self, items: Sequence[Inbound], now: datetime) -> tuple[list[Reply], int]:
        await self._connect()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[list[Reply], int]] = loop.create_future()
        self._pending.append(_Caller(list(items), now, answer))
        if len(self._pending) >= self.COALESCE:
            self._send()
        elif len(self._pending) == 1:
            loop.call_soon(self._send)  # the rest of this turn's, at its end
        return await answer

    def _send(self) -> None:
        """The events handed over since the last send, as one message."""
        callers, self._pending = self._pending, []
        if not callers:
            return
        if self._writer is None:  # the process went away in between
            _fail(callers, _unavailable("the writer process exited"))
            return
        items = [item for c in callers for item in c.items]
        message = pickle.dumps((items, max(c.now for c in callers)), pickle.HIGHEST_PROTOCOL)
        self._waiting.append(callers)
        self._writer.write(_HEADER.pack(len(message)) + message)

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is not None:
            return self._writer
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if self._writer is None:
                if self._process is None or not self._process.is_alive():
                    self._start()
                assert self._socket is not None
                reader, self._writer = await asyncio.open_unix_connection(sock=self._socket)
                self._loop = asyncio.get_running_loop()
                self._reading = self._loop.create_task(self._read(reader))
        return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Answer each batch sent, in order, until the process goes away."""
        try:
            while True:
                (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                ok, payload = pickle.loads(await reader.readexactly(size))  # noqa: S301 - ours
                callers = self._waiting.popleft()
                if not ok:
                    _fail(callers, payload)
                    continue
                replies, committed = payload
                shares = _shares(replies, committed, [len(c.items) for c in callers])
                for c, share in zip(callers, shares, strict=True):
                    if not c.answer.done():
                        c.answer.set_result(share)
        except (EOFError, OSError, asyncio.IncompleteReadError):
            if self._process is None:
                return  # closed on purpose
            code = self._stop()
            if self._waiting:
                log.warning("the writer process exited (code %s) with batches in flight", code)
            lost = _unavailable(f"writer process exited with code {code}")
            while self._waiting:
                _fail(self._waiting.popleft(), lost)

    def _start(self) -> None:
        self._stop()
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = socket.socketpair()
        process = ctx.Process(target=serve, args=(self.settings, theirs), name=self.name)
        process.daemon = True  # stopped with the service, never outliving it
        process.start()
        theirs.close()
        self._process, self._socket = process, ours

    def _stop(self) -> int | None:
        process, sock, writer = self._process, self._socket, self._writer
        self._process, self._socket, self._writer = None, None, None
        if sock is not None:  # the process sees EOF now and exits once its batch is done
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            if writer is not None and self._loop is not None and not self._loop.is_closed():
                writer.close()  # the transport closes the socket
            else:
                sock.close()
        if process is None:
            return None
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
        code: int | None = process.exitcode
        return code

    def close(self) -> None:
        self._stop()
        if self._reading is not None:
            self._reading.cancel()
        closed = _unavailable("the service is shutting down")
        while self._waiting:  # (uvicorn drains requests first: normally none are left)
            _fail(self._waiting.popleft(), closed)
        _fail(self._pending, closed)
        self._pending = []


class _Caller(NamedTuple):
    """One `apply`: its events, its `now`, and where its answer goes."""

    items: list[Inbound]
    now: datetime
    answer: asyncio.Future[tuple[list[Reply], int]]


def _shares(
    replies: list[Reply], committed: int, lengths: Sequence[int]
) -> list[tuple[list[Reply], int]]:
    """`replies` cut into consecutive parts of `lengths`, each with the size of the commit
    told once, with the first part: a histogram of batch sizes counts each commit once
    however many batches (or callers) shared it."""
    out, at = [], 0
    for n, length in enumerate(lengths):
        out.append((replies[at : at + length], committed if n == 0 else 0))
        at += length
    return out


def _fail(callers: Sequence[_Caller], exc: BaseException) -> None:
    for c in callers:
        if not c.answer.done():
            c.answer.set_exception(exc)


def _unavailable(why: str) -> OperationalError:
    """Said as SQLAlchemy says a lost database, so callers answer 503 and retry."""
    return OperationalError(why, None, WriterLost(why), connection_invalidated=True)


def serve(settings: Settings, sock: socket.socket) -> None:
    """The writer process: apply what arrives, answer each batch, until the socket closes.
    Batches that arrived while the last transaction ran are merged into the next one (up
    to `dispatch_max_batch` events), written with the newest of their `now`s."""
    from app.db import engine_for
    from app.heap import freeze_startup_heap
    from app.observability import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    engine = engine_for(settings)
    freeze_startup_heap()
    frames = _Frames(sock)
    try:
        while (first := frames.next(block=True)) is not None:
            batches: list[tuple[list[Inbound], datetime]] = [pickle.loads(first)]  # noqa: S301
            size = len(batches[0][0])
            while size < settings.dispatch_max_batch and (more := frames.next(block=False)):
                batches.append(pickle.loads(more))  # noqa: S301 - from our own parent
                size += len(batches[-1][0])
            items = [item for batch, _ in batches for item in batch]
            try:
                replies = apply_batch(engine, items, max(now for _, now in batches))
            except Exception as exc:  # the dispatcher decides what a failed batch means
                answers = [_dumps((False, exc))] * len(batches)
            else:
                shares = _shares(replies, size, [len(batch) for batch, _ in batches])
                answers = [_dumps((True, share)) for share in shares]
            try:
                sock.sendall(b"".join(_HEADER.pack(len(a)) + a for a in answers))
            except (BrokenPipeError, ConnectionResetError):
                log.warning("the service went away before its last batch was answered")
                return
    finally:
        engine.dispose()
        sock.close()


class _Frames:
    """Length-prefixed messages from a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf, self.eof = sock, bytearray(), False

    def next(self, *, block: bool) -> bytes | None:
        """The next whole message; None at the end of the stream or, when not blocking,
        when no whole message has arrived yet."""
        while True:
            if len(self.buf) >= _HEADER.size:
                end = _HEADER.size + _HEADER.unpack_from(self.buf)[0]
                if len(self.buf) >= end:
                    message = bytes(self.buf[_HEADER.size : end])
                    del self.buf[:end]
                    return message
            if self.eof:
                return None
            try:
                data = self.sock.recv(1 << 20, 0 if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except ConnectionResetError:
                data = b""  # the service is gone: as the end of the stream
            if not data:
                self.eof = True
            self.buf += data


def _dumps(answer: tuple[bool, Any]) -> bytes:
    try:
        return pickle.dumps(answer, pickle.HIGHEST_PROTOCOL)
    except Exception:  # an error from the driver that does not pickle: its name and text
        ok, exc = answer
        if ok:
            raise
        orig = getattr(exc, "orig", exc)
        cause = f"{type(orig).__name__}: {orig}"
        if isinstance(exc, OperationalError):
            return pickle.dumps((False, _unavailable(cause)), pickle.HIGHEST_PROTOCOL)
        return pickle.dumps((False, RuntimeError(cause)), pickle.HIGHEST_PROTOCOL)
