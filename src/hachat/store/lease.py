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

`read_lease`, `try_acquire`, `renew` and `release` run on `db.control`, the keeper's own
connections (see `control.py`), never on the request handlers' pool.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    def free_for(self) -> float:
        """Seconds since the lease was released or expired, by the database clock (0 when
        held)."""
        return 0.0 if self.held else max(0.0, self.db_now - self.expires_at)

    @property
    def remaining(self) -> float:
        """Seconds until expiry by the database clock (0 when not held)."""
        return max(0.0, self.expires_at - self.db_now) if self.held else 0.0


def read_lease(db: Database) -> LeaseState:
    """The lease row and the database's clock, read on the keeper's own connections."""
    now = db_now_sql(db.dialect)
    row = db.control.run(
        f"SELECT holder, holder_url, epoch, expires_at, {now} AS db_now FROM lease WHERE id = :id",
        {"id": LEASE_ID}, write=False,
    ).first()
    if row is None:
        raise LookupError("the lease row is missing: run the migrations")
    holder, holder_url, epoch, expires_at, db_now = row
    return LeaseState(holder, holder_url, int(epoch), float(expires_at), float(db_now))


def try_acquire(db: Database, node_id: str, node_url: str, ttl: float) -> int | None:
    """Take the lease if it is free or expired; return the new epoch, or None if it is held.

    One write transaction. Acquiring raises the epoch even when `node_id` held it before.
    """
    now = db_now_sql(db.dialect)
    acquire = (f"UPDATE lease SET epoch = epoch + 1, holder = :node, holder_url = :url, "
               f"expires_at = {now} + :ttl, acquired_at = {now} "
               f"WHERE id = :id AND (holder IS NULL OR expires_at <= {now}) "
               "RETURNING epoch")
    params = {"node": node_id, "url": node_url, "ttl": float(ttl), "id": LEASE_ID}
    if db.dialect == "postgresql":
        with db.control.transaction() as run:
            # Wait for writers in flight (they hold the gate shared); block new ones until
            # this transaction ends.
            run("SELECT pg_advisory_xact_lock(:ns, :key)", {"ns": GATE[0], "key": GATE[1]})
            run("SELECT id FROM lease WHERE id = :id FOR UPDATE", {"id": LEASE_ID})
            row = run(acquire, params).first()
    else:
        # One statement is one transaction, under SQLite's write lock.
        row = db.control.run(acquire, params, write=True).first()
    return None if row is None else int(row[0])


def renew(db: Database, node_id: str, epoch: int, ttl: float) -> bool:
    """Extend the lease to db-now + ttl if `node_id` still holds it under `epoch`.

    One statement, its own transaction, on the keeper's own connections: the holder and epoch
    are checked by the UPDATE itself.
    """
    now = db_now_sql(db.dialect)
    outcome = db.control.run(
        f"UPDATE lease SET expires_at = {now} + :ttl "
        "WHERE id = :id AND holder = :node AND epoch = :epoch",
        {"ttl": float(ttl), "id": LEASE_ID, "node": node_id, "epoch": int(epoch)}, write=True,
    )
    return outcome.rowcount == 1


def release(db: Database, node_id: str, epoch: int) -> bool:
    """Give the lease up (so a peer may acquire it at once). The epoch is kept: the next
    acquire raises it. `expires_at` becomes the moment of release, so a free lease tells how
    long it has been free (`db_now - expires_at`), released or expired alike."""
    now = db_now_sql(db.dialect)
    outcome = db.control.run(
        f"UPDATE lease SET holder = NULL, holder_url = NULL, expires_at = {now} "
        "WHERE id = :id AND holder = :node AND epoch = :epoch",
        {"id": LEASE_ID, "node": node_id, "epoch": int(epoch)}, write=True,
    )
    return outcome.rowcount == 1


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
