"""Turns at SQLite's one write lock: the dispatcher's writer gives way to every other writer.

SQLite lets one connection write at a time, and a connection that finds the lock taken
sleeps and tries again (its busy handler: 1, 2, 5 … then 100 ms between tries, until
`busy_timeout`). Under sustained load the dispatcher's writer holds the lock batch after
batch and lets go of it only for the fraction of a millisecond between a commit and its
next BEGIN. A worker's round (timers, sweeps, deliveries, the report's roll-up) or an
admin's write, trying every 100 ms once its first tries have failed, rarely lands in that
gap: it waited seconds, or out its busy timeout ("database is locked"), for as long as the
load lasted.

So every other writer *asks* for a turn from its BEGIN until its commit or rollback, and
the dispatcher's writer, before each batch's BEGIN, *gives way* while anyone asks: it waits
for the askers' transactions to end (up to `GIVE_WAY_SECONDS`, then it queues at the lock
as before). An asker is kept waiting by at most the batch in progress.

The ask is a shared lock (`fcntl.lockf`) on the first byte of a file beside the database,
`<database>-turn`: the writer sees it from another process with a non-blocking test (a few
µs per batch), and the operating system drops it with the process that held it, so a
crashed asker leaves no ask behind. Such locks belong to a process, not to a thread, so
the threads of one process count their asks here and hold the lock while any asks; the
writer of the same process (dispatch mode `thread`) reads the count. One `Turn` per
database file per process: closing any descriptor of the file would drop the process's
lock, so this module opens each file once.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

GIVE_WAY_SECONDS = 0.5
_POLL_SECONDS = 0.0005

_turns: dict[tuple[int, str], Turn] = {}
_turns_lock = threading.Lock()


class Turn:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        self._asking = 0

    def ask(self) -> None:
        """This thread is about to write, or waiting to: the writer gives way until `done`."""
        with self._lock:
            if self._asking == 0:
                fcntl.lockf(self._fd, fcntl.LOCK_SH, 1, 0)
            self._asking += 1

    def done(self) -> None:
        with self._lock:
            self._asking -= 1
            if self._asking == 0:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)

    def asked(self) -> bool:
        """Whether a thread of this process, or another process, asks."""
        with self._lock:  # no ask of this process comes or goes during the test
            if self._asking:
                return True
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError:  # held, shared, by an asker
                return True
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)
            return False

    def give_way(self, limit: float = GIVE_WAY_SECONDS) -> float:
        """Wait while anyone asks, up to `limit` seconds; the seconds waited."""
        if not self.asked():
            return 0.0
        start = time.monotonic()
        while time.monotonic() - start < limit and self.asked():
            time.sleep(_POLL_SECONDS)
        return time.monotonic() - start


def turn_for(database: str) -> Turn:
    """This process's `Turn` for a SQLite database file."""
    path = str(Path(database).resolve()) + "-turn"
    key = (os.getpid(), path)
    with _turns_lock:
        hit = _turns.get(key)
        if hit is None:
            hit = _turns[key] = Turn(path)
        return hit
