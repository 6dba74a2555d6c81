"""`Database`: engines, sessions, driver-error mapping and migrations.

SQLite gets two engines on the same file: a read engine (deferred `BEGIN`, `query_only`) and a
write engine with a pool of one connection that emits `BEGIN IMMEDIATE`, so a write transaction
holds SQLite's single write lock from its first statement and writers queue for their turn
(`WriteTurns`) instead of failing with "database is locked" half-way through. PostgreSQL gets
one psycopg 3 engine; reads run in `BEGIN READ ONLY` transactions.

Both also get `Database.control`, a few connections of the lease keeper's own
(`store/control.py`), so request handlers can never make a lease renewal wait for a connection.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from sqlalchemy import create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from .control import ControlLane
from .errors import StoreError, StoreUnavailable
from .turns import WriteTurns

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any constant will do; it only has to be the same for every hachat process.
MIGRATION_LOCK_KEY = 0x6861636861740001
# The lease keeper's connections: one for the keeper thread, one for a concurrent release
# (POST /fall, shutdown) while a renewal hangs on a dead network, one spare.
CONTROL_POOL_SIZE = 2
CONTROL_POOL_OVERFLOW = 1
CONTROL_APPLICATION_NAME = "hachat-lease"

# SQLite primary result codes meaning "busy / cannot get at the file": BUSY, LOCKED, IOERR,
# FULL, CANTOPEN, PROTOCOL. (SQLITE_ERROR, e.g. "no such table", is a bug, not an outage.)
_SQLITE_UNAVAILABLE_CODES = {5, 6, 10, 13, 14, 15}
_SQLITE_UNAVAILABLE_WORDS = ("database is locked", "database table is locked", "unable to open",
                             "disk i/o error", "database or disk is full")


def utcnow_iso(dt: datetime | None = None) -> str:
    """ISO 8601 in UTC with millisecond precision and a 'Z': `2025-01-02T03:04:05.678Z`.

    A naive datetime is taken to be UTC already; `None` means now.
    """
    if dt is None:
        dt = datetime.now(timezone.utc)
    elif dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    else:
        dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by `***`, safe to print or log."""
    return make_url(url).render_as_string(hide_password=True)


def alembic_config():
    """An Alembic `Config` pointing at the migrations shipped inside the package."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return cfg


def is_unavailable_error(exc: BaseException) -> bool:
    """True when `exc` means "the database cannot be used right now" rather than a bug or a
    constraint violation: unreachable, connection lost, pool exhausted, locked too long."""
    if isinstance(exc, sa_exc.IntegrityError):
        return False
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection became free in time
        return True
    orig: BaseException = exc
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
    if isinstance(orig, sqlite3.IntegrityError | psycopg.IntegrityError):
        return False
    if isinstance(orig, sqlite3.OperationalError):
        code = getattr(orig, "sqlite_errorcode", None)
        if code is not None and (code & 0xFF) in _SQLITE_UNAVAILABLE_CODES:
            return True
        message = str(orig).lower()
        return any(word in message for word in _SQLITE_UNAVAILABLE_WORDS)
    # psycopg's OperationalError covers: cannot connect, connection lost / closed, admin
    # shutdown, query canceled (statement_timeout), lock_not_available (lock_timeout),
    # deadlock / serialization failure, too many connections.
    return isinstance(orig, psycopg.OperationalError)


def _switch_to_wal(cursor, timeout: float) -> None:
    """Put the file in WAL mode. On a new file the switch needs a lock that SQLite does not
    wait for through busy_timeout, so connections opened together (threads, or nodes starting
    on one file) would fail with "database is locked": wait for it here, as long as
    busy_timeout would have."""
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _sqlite_on_connect(busy_timeout_ms: int, read_only: bool):
    def on_connect(dbapi_connection, connection_record) -> None:
        # The known recipe: stop pysqlite from issuing BEGIN itself; we emit it in "begin".
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms:d}")
            _switch_to_wal(cursor, busy_timeout_ms / 1000)
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = NORMAL")
            if read_only:
                cursor.execute("PRAGMA query_only = ON")
        finally:
            cursor.close()

    return on_connect


def _autocommit_on_connect(dbapi_connection, connection_record) -> None:
    # Control statements commit one by one; a multi-statement transaction sends BEGIN itself.
    dbapi_connection.autocommit = True


def _sqlite_begin(statement: str):
    def on_begin(conn) -> None:
        conn.exec_driver_sql(statement)

    return on_begin


class Database:
    """The one way into the database. Thread-safe; build one per process.

    `lock_timeout` (seconds) bounds every wait for a lock or a pooled connection: SQLite's
    busy_timeout, PostgreSQL's lock_timeout, and the pool checkout timeout. Past it the
    operation fails with `StoreUnavailable`.

    `control` is the lease keeper's lane (`ControlLane`), with its own connections.
    """

    def __init__(self, url: str, pool_size: int = 16, *, lock_timeout: float = 5.0,
                 connect_timeout: float = 3.0, statement_timeout: float = 30.0,
                 idle_in_transaction_timeout: float = 10.0) -> None:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        self.pool_size = pool_size
        self.lock_timeout = lock_timeout
        self.idle_in_transaction_timeout = idle_in_transaction_timeout
        if backend == "sqlite":
            self.dialect = "sqlite"
            self._init_sqlite(parsed)
        elif backend == "postgresql":
            self.dialect = "postgresql"
            self._init_postgresql(parsed, connect_timeout, statement_timeout)
        else:
            raise ValueError(f"unsupported database {backend!r}: use sqlite or postgresql")
        self.safe_url = mask_url(self.url)

    # -- construction -----------------------------------------------------------------------

    def _init_sqlite(self, url: URL) -> None:
        path = url.database
        if not path or path == ":memory:" or url.query.get("mode") == "memory":
            raise ValueError("hachat needs a SQLite file (two engines share it), not :memory:")
        if url.drivername != "sqlite":
            url = url.set(drivername="sqlite")  # the stdlib sqlite3 driver (pysqlite)
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        busy_ms = max(1, int(self.lock_timeout * 1000))
        connect_args = {"check_same_thread": False, "timeout": self.lock_timeout}
        self._write_engine = create_engine(
            url, poolclass=QueuePool, pool_size=1, max_overflow=0,
            pool_timeout=self.lock_timeout, connect_args=connect_args,
        )
        event.listen(self._write_engine, "connect", _sqlite_on_connect(busy_ms, read_only=False))
        event.listen(self._write_engine, "begin", _sqlite_begin("BEGIN IMMEDIATE"))
        self._read_engine = create_engine(
            url, poolclass=QueuePool, pool_size=self.pool_size, max_overflow=self.pool_size,
            pool_timeout=self.lock_timeout, connect_args=connect_args,
        )
        event.listen(self._read_engine, "connect", _sqlite_on_connect(busy_ms, read_only=True))
        event.listen(self._read_engine, "begin", _sqlite_begin("BEGIN"))
        # One write transaction at a time in this process; the lease keeper's goes first.
        self._turns: WriteTurns | None = WriteTurns()
        # Its own connection, so it never waits for the pooled one; it still needs the file's
        # write lock, and cross-process waits for it are bounded by busy_timeout.
        control_engine = create_engine(
            url, poolclass=QueuePool, pool_size=CONTROL_POOL_SIZE,
            max_overflow=CONTROL_POOL_OVERFLOW, pool_timeout=self.lock_timeout,
            connect_args=connect_args,
        )
        event.listen(control_engine, "connect", _sqlite_on_connect(busy_ms, read_only=False))
        self.control = ControlLane(control_engine, translate=self._translate, turns=self._turns,
                                   wait_timeout=self.lock_timeout)
        self._engines: tuple[Engine, ...] = (self._write_engine, self._read_engine,
                                             control_engine)

    def _init_postgresql(self, url: URL, connect_timeout: float,
                         statement_timeout: float) -> None:
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        self.url = url
        lock_ms = max(1, int(self.lock_timeout * 1000))
        connect_args: dict[str, object] = {
            # libpq: whole seconds, and anything below 2 counts as 2.
            "connect_timeout": max(2, round(connect_timeout)),
            # Notice a dead server or network in ~10 s instead of the kernel's ~2 hours.
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
            "keepalives_count": 3,
        }
        if "options" not in url.query:
            # lock_timeout: a takeover waits for writers in flight, but not forever.
            # idle_in_transaction: a paused process must not hold the lease row's lock forever.
            idle_ms = max(500, int(self.idle_in_transaction_timeout * 1000))
            connect_args["options"] = (
                f"-c lock_timeout={lock_ms} -c statement_timeout={int(statement_timeout * 1000)}"
                f" -c idle_in_transaction_session_timeout={idle_ms}"
            )
        # No pre-ping (a round trip per transaction): a connection found dead fails its request
        # with StoreUnavailable, and SQLAlchemy then discards the whole pool, so the next
        # requests reconnect.
        engine = create_engine(
            url, pool_size=self.pool_size, max_overflow=max(2, self.pool_size // 4),
            pool_timeout=self.lock_timeout, pool_recycle=1800,
            connect_args=connect_args,
        )
        self._write_engine = engine
        # psycopg then sends BEGIN READ ONLY itself; reset when the connection is returned.
        self._read_engine = engine.execution_options(postgresql_readonly=True)
        # Renewals are plain UPDATEs that need nothing the writers hold: no write turns.
        self._turns = None
        control_args = dict(connect_args)
        if "application_name" not in url.query:
            control_args["application_name"] = CONTROL_APPLICATION_NAME  # for pg_stat_activity
        control_engine = create_engine(
            url, pool_size=CONTROL_POOL_SIZE, max_overflow=CONTROL_POOL_OVERFLOW,
            pool_timeout=self.lock_timeout, pool_recycle=1800, connect_args=control_args,
        )
        event.listen(control_engine, "connect", _autocommit_on_connect)
        self.control = ControlLane(control_engine, translate=self._translate, turns=None,
                                   wait_timeout=self.lock_timeout)
        self._engines = (engine, control_engine)

    # -- sessions -----------------------------------------------------------------------------

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except (sa_exc.SQLAlchemyError, sqlite3.Error, psycopg.Error) as exc:
            if is_unavailable_error(exc):
                orig = getattr(exc, "orig", None) or exc
                first_line = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
                raise StoreUnavailable(f"database unavailable ({self.safe_url}): "
                                       f"{first_line}") from exc
            raise

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A Session in a read-only transaction. Loaded objects stay usable after the block."""
        # Ends with COMMIT, not ROLLBACK: a rollback would expire every loaded object.
        with (self._translate(), Session(self._read_engine, expire_on_commit=False) as session,
              session.begin()):
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A Session in one write transaction: committed on clean exit, rolled back on error.

        Do not nest `write()` inside `write()` on SQLite: one write transaction at a time.
        """
        with (self._translate(), self._write_turn(),
              Session(self._write_engine, expire_on_commit=False) as session, session.begin()):
            yield session

    def _write_turn(self) -> AbstractContextManager[None]:
        if self._turns is None:
            return contextlib.nullcontext()
        return self._turns.turn(self.lock_timeout)

    # -- maintenance ----------------------------------------------------------------------------

    def upgrade(self, revision: str = "head") -> None:
        """Run the Alembic migrations shipped with the package up to `revision` (idempotent).

        One transaction; concurrent upgrades from several processes serialize (SQLite's write
        lock, or a PostgreSQL advisory transaction lock).
        """
        from alembic import command

        cfg = alembic_config()
        with self._translate(), self._write_engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SET LOCAL statement_timeout = 0"))
                conn.execute(text("SET LOCAL lock_timeout = '60s'"))
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": MIGRATION_LOCK_KEY})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        log.info("database %s is at schema %s", self.safe_url, revision)

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self._translate(), self._read_engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @staticmethod
    def head_revision() -> str | None:
        """The newest revision shipped with this code."""
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    def ping(self) -> bool:
        """True when a trivial query succeeds."""
        try:
            with self.read() as session:
                session.execute(text("SELECT 1"))
            return True
        except StoreUnavailable:
            return False

    def dispose(self) -> None:
        """Close every pooled connection. The object stays usable (it reconnects)."""
        for engine in self._engines:
            engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.safe_url!r})"
