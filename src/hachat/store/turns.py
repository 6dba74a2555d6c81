"""`WriteTurns`: whose turn it is to hold SQLite's write lock in this process.

SQLite has one write lock per file, and every write transaction takes it at `BEGIN IMMEDIATE`.
Request handlers wait for their turn here, one after the other, in arrival order. The lease
keeper's renewal needs the same lock, but it must not wait behind a queue of request handlers:
an *urgent* turn goes next, right after the write transaction in progress.

Why not let the keeper's own connection simply compete for the file lock (busy_timeout)?
SQLite's busy handler sleeps and polls (1, 2, 5 ... then 100 ms between tries) and is not
fair: a handler returning the lock hands it straight to the next queued handler, and a poller
only wins if it happens to try in the microseconds the lock is free. Under a steady stream of
writes it can lose for seconds. A turn here is handed over deterministically.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import StoreUnavailable


class WriteTurns:
    """One write transaction at a time; urgent turns go before ordinary ones.

    Ordinary waiters are woken one at a time (no thundering herd of request threads on
    every commit). Thread-safe.
    """

    def __init__(self) -> None:
        lock = threading.Lock()
        self._ordinary = threading.Condition(lock)
        self._urgent = threading.Condition(lock)
        self._busy = False
        self._urgent_waiting = 0

    @contextmanager
    def turn(self, timeout: float, *, urgent: bool = False) -> Iterator[None]:
        """Hold the turn for the body; `StoreUnavailable` if it is not ours within `timeout`."""
        self._take(timeout, urgent)
        try:
            yield
        finally:
            self._give_back()

    @property
    def busy(self) -> bool:
        with self._ordinary:
            return self._busy

    def _take(self, timeout: float, urgent: bool) -> None:
        deadline = time.monotonic() + timeout
        with self._ordinary:
            if urgent:
                self._urgent_waiting += 1
                try:
                    while self._busy:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise StoreUnavailable(f"no write turn within {timeout:g} s")
                        self._urgent.wait(remaining)
                finally:
                    self._urgent_waiting -= 1
            else:
                # An ordinary thread never takes a free turn while an urgent one is waiting
                # for it: the turn was freed for the urgent one.
                while self._busy or self._urgent_waiting:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        # A wake-up meant for us may have come as we gave up: pass it on.
                        self._wake_next()
                        raise StoreUnavailable(f"no write turn within {timeout:g} s")
                    self._ordinary.wait(remaining)
            self._busy = True

    def _give_back(self) -> None:
        with self._ordinary:
            self._busy = False
            self._wake_next()

    def _wake_next(self) -> None:
        # Called with the lock held.
        if self._busy:
            return
        if self._urgent_waiting:
            self._urgent.notify()
        else:
            self._ordinary.notify()
