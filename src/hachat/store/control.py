"""`ControlLane`: the lease keeper's own connections, outside the request handlers' pool.

A renewal that queues for a connection behind request handlers can miss its deadline when the
node is busiest, and the node then steps down for nothing. So the lease statements run on a
small engine of their own (`Database.control`), never lent to a request:

- PostgreSQL: its own two connections (application_name `hachat-lease`). A renewal is one
  plain UPDATE of the lease row, which no writer locks (writers hold the advisory gate shared
  and only read the row), so it waits for nothing the request handlers hold.
- SQLite: its own connection too, but a renewal is a write and needs the file's one write lock,
  so it still waits for the write transaction in progress; it takes an *urgent* turn
  (`WriteTurns`) and goes next, instead of behind every queued request handler.

Statements go straight to the driver (no Session, no SQL compilation) in autocommit mode: a
renewal is one statement, committed by itself, one round trip. Less Python per renewal also
means fewer times the keeper thread has to win the GIL back from busy request threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from . import rawsql
from .turns import WriteTurns

Run = Callable[[str, Mapping[str, Any]], "Outcome"]


@dataclass(frozen=True)
class Outcome:
    """What one statement did: rows it returned (all fetched) and rows it changed."""

    rows: list[tuple[Any, ...]]
    rowcount: int

    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None


class ControlLane:
    """Lease statements on the keeper's own connections. Thread-safe.

    `translate` maps driver errors to the store's errors (`StoreUnavailable`); `turns` (SQLite
    only) orders write transactions within this process; `wait_timeout` bounds the wait for a
    turn. Connections found broken are discarded, so the next call reconnects.
    """

    def __init__(self, engine: Engine, *, translate: Callable[[], AbstractContextManager[None]],
                 turns: WriteTurns | None, wait_timeout: float) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._translate = translate
        self._turns = turns
        self._wait_timeout = wait_timeout

    def run(self, sql: str, params: Mapping[str, Any], *, write: bool) -> Outcome:
        """One statement, committed on its own (autocommit). `sql` uses `:name` parameters."""
        with self._translate(), self._turn(write), self._connection() as conn:
            return _execute(conn, rawsql.driver_sql(sql, self.dialect), params)

    @contextmanager
    def transaction(self) -> Iterator[Run]:
        """Several statements in one write transaction, committed on clean exit; yields
        `run(sql, params) -> Outcome`."""
        begin = "BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN"
        with self._translate(), self._turn(True), self._connection() as conn:
            _execute(conn, begin, {})
            try:
                yield lambda sql, params: _execute(conn, rawsql.driver_sql(sql, self.dialect),
                                                   params)
            except BaseException:
                with contextlib.suppress(Exception):
                    _execute(conn, "ROLLBACK", {})
                raise
            _execute(conn, "COMMIT", {})

    def dispose(self) -> None:
        self.engine.dispose()

    # -- internals ------------------------------------------------------------------------------

    def _turn(self, write: bool) -> AbstractContextManager[None]:
        if write and self._turns is not None:
            return self._turns.turn(self._wait_timeout, urgent=True)
        return contextlib.nullcontext()

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        conn = self.engine.raw_connection()
        try:
            yield conn
        except Exception as exc:
            if self._broken(exc, conn):
                conn.invalidate(exc)  # a dead connection must not be handed out again
            raise
        finally:
            conn.close()  # back to the pool, which rolls back anything left open

    def _broken(self, exc: Exception, conn: Any) -> bool:
        dialect = self.engine.dialect
        if not isinstance(exc, dialect.loaded_dbapi.Error):
            return False
        return bool(dialect.is_disconnect(exc, conn.dbapi_connection, None))


def _execute(conn: Any, sql: str, params: Mapping[str, Any]) -> Outcome:
    cursor = conn.cursor()
    try:
        cursor.execute(sql, params)
        rows = cursor.fetchall() if cursor.description is not None else []
        return Outcome([tuple(row) for row in rows], cursor.rowcount)
    finally:
        cursor.close()
