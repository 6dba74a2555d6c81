"""The fencing lease: one row (id=1) naming the active node and its epoch.

Expiry is judged only by the database's clock, so nodes' clocks may disagree freely. The epoch
is the fencing token: every write made by the active node runs `assert_holder` inside its own
transaction, and the epoch changes only through `try_acquire`, which on PostgreSQL first waits
for every writer in flight (row lock), so no write carrying an old epoch can commit after a
newer epoch was granted.

PostgreSQL: a transaction-level advisory lock is the gate between writers and a takeover.
- writers (`assert_holder`): take it SHARED (many at once, held until their commit), then read
  the lease row in a second statement, whose snapshot is taken after the lock was granted.
- takeover (`try_acquire`): takes it EXCLUSIVE first: it waits for every writer in flight, and
  writers arriving later wait for it, then read the new epoch and are fenced.
- `renew` / `release`: plain UPDATEs, not gated: the holder's renewals never queue behind its
  own writers.
An advisory lock lives in the lock manager's memory; a row lock shared by many writers (FOR
KEY SHARE) would rewrite the hot lease row's lock marker (a MultiXact) on every write instead.
The lock carries no epoch of its own: the epoch read under it is the fencing token.
On SQLite every write transaction starts with `BEGIN IMMEDIATE`, so all of this is serialized
by the database's single write lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from . import rawsql
from .db import Database
from .errors import Fenced

__all__ = ["Fenced", "LeaseState", "assert_holder", "read_lease", "release", "renew",
           "try_acquire"]

LEASE_ID = 1
# (namespace, key) of the advisory lock that gates writes against takeovers.
GATE = (0x68616368, 1)  # "hach"
_PG_NOW = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"


def db_now_sql(dialect: str) -> str:
    """SQL for the database's current time in unix seconds (not the transaction start time)."""
    return _PG_NOW if dialect == "postgresql" else _SQLITE_NOW


@dataclass(frozen=True)
class LeaseState:
    holder: str | None
    holder_url: str | None
    epoch: int
    expires_at: float
    db_now: float

    @property
    def held(self) -> bool:
        return self.holder is not None and self.expires_at > self.db_now

    @property
    def remaining(self) -> float:
        """Seconds until expiry by the database clock (0 when not held)."""
        return max(0.0, self.expires_at - self.db_now) if self.held else 0.0


def read_lease(db: Database) -> LeaseState:
    now = db_now_sql(db.dialect)
    with db.read() as s:
        row = s.execute(
            text(f"SELECT holder, holder_url, epoch, expires_at, {now} AS db_now "
                 "FROM lease WHERE id = :id"),
            {"id": LEASE_ID},
        ).one()
    return LeaseState(row.holder, row.holder_url, int(row.epoch), float(row.expires_at),
                      float(row.db_now))


def try_acquire(db: Database, node_id: str, node_url: str, ttl: float) -> int | None:
    """Take the lease if it is free or expired; return the new epoch, or None if it is held.

    One write transaction. Acquiring raises the epoch even when `node_id` held it before.
    """
    now = db_now_sql(db.dialect)
    with db.write() as s:
        if db.dialect == "postgresql":
            # Wait for writers in flight (they hold the gate shared); block new ones until
            # this transaction ends.
            s.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                      {"ns": GATE[0], "key": GATE[1]})
            s.execute(text("SELECT id FROM lease WHERE id = :id FOR UPDATE"), {"id": LEASE_ID})
        row = s.execute(
            text(f"UPDATE lease SET epoch = epoch + 1, holder = :node, holder_url = :url, "
                 f"expires_at = {now} + :ttl, acquired_at = {now} "
                 f"WHERE id = :id AND (holder IS NULL OR expires_at <= {now}) "
                 "RETURNING epoch"),
            {"node": node_id, "url": node_url, "ttl": float(ttl), "id": LEASE_ID},
        ).first()
    return None if row is None else int(row.epoch)


def renew(db: Database, node_id: str, epoch: int, ttl: float) -> bool:
    """Extend the lease to db-now + ttl if `node_id` still holds it under `epoch`."""
    now = db_now_sql(db.dialect)
    with db.write() as s:
        result = s.execute(
            text(f"UPDATE lease SET expires_at = {now} + :ttl "
                 "WHERE id = :id AND holder = :node AND epoch = :epoch"),
            {"ttl": float(ttl), "id": LEASE_ID, "node": node_id, "epoch": int(epoch)},
        )
        return result.rowcount == 1


def release(db: Database, node_id: str, epoch: int) -> bool:
    """Give the lease up (so a peer may acquire it at once). The epoch is kept: the next
    acquire raises it."""
    with db.write() as s:
        result = s.execute(
            text("UPDATE lease SET holder = NULL, holder_url = NULL, expires_at = 0 "
                 "WHERE id = :id AND holder = :node AND epoch = :epoch"),
            {"id": LEASE_ID, "node": node_id, "epoch": int(epoch)},
        )
        return result.rowcount == 1


def assert_holder(session: Session, node_id: str, epoch: int) -> None:
    """Inside a `db.write()` transaction, before writing: raise `Fenced` unless `node_id`
    holds the lease under `epoch`. Expiry is not checked: the epoch is the fencing token.

    On PostgreSQL this holds the write gate shared until the transaction ends, so a takeover
    waits for this transaction, and every later write reads the new epoch.
    """
    # Plain SQL through the driver: this runs at the start of every write.
    if rawsql.dialect_of(session) == "postgresql":
        rawsql.run(session, "SELECT pg_advisory_xact_lock_shared(:ns, :key)",
                   {"ns": GATE[0], "key": GATE[1]})
    holder, current = rawsql.run(session, "SELECT holder, epoch FROM lease WHERE id = :id",
                                 {"id": LEASE_ID}).one()
    if holder != node_id or int(current) != int(epoch):
        raise Fenced(node_id, epoch, holder, int(current))
