"""Lease renewal latency while the node is busy, in one process, as in a node.

    python -m bench.lease_bench                    # SQLite, 10 s per case
    python -m bench.lease_bench --pg               # the same on a fresh PostgreSQL database
    python -m bench.lease_bench --seconds 3        # a quicker look
    python -m bench.lease_bench --pg --pool-size 4 # PostgreSQL with the request pool exhausted

A renewal is timed every 0.25 s (LEASE_RENEW_INTERVAL) for `--seconds`, under two loads:

- writers: 16 threads (the node's default WORKERS) run fenced write transactions through the
  request handlers' pool (`Database.write()` + `assert_holder`), each holding its transaction
  0.1 s on SQLite (so they queue for the one write lock) or 1 s on PostgreSQL (so, with
  `--pool-size` below 13, they take every pooled connection).
- gil: 16 threads run pure Python without pause: the request handlers saturate the GIL.

and three ways to renew:

- lane: `store.lease.renew` on `Database.control`, the keeper's own connections (what the
  keeper does);
- pool: the same UPDATE through `Database.write()`, the request handlers' pool;
- pool+timer: that, plus a `threading.Timer` started and cancelled around each renewal (what
  the keeper did before it had its own connections and one long-lived watchdog thread).

Reported per case: renewals timed, p50 / p99 / max time, and how many took longer than the
default local deadline allows (LEASE_TTL 1.5 s - margin 0.25 s = 1.25 s). A renewal that fails
(a pool or lock timeout, 5 s) counts as late.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text

from bench.common import (
    create_pg_database,
    drop_pg_database,
    format_table,
    nearest_rank_percentile,
    pg_url,
    source_revision,
)
from hachat.store import Database, Fenced, StoreUnavailable
from hachat.store.lease import assert_holder, db_now_sql, renew, try_acquire

WORKERS = 16
RENEW_INTERVAL = 0.25
LOCAL_DEADLINE = 1.5 - 0.25
HOLD = {"sqlite": 0.1, "postgresql": 1.0}  # seconds each writer holds its transaction
NODE = "bench-node"


def renew_through_request_pool(db: Database, epoch: int, ttl: float) -> bool:
    now = db_now_sql(db.dialect)
    with db.write() as s:
        return s.execute(
            text(f"UPDATE lease SET expires_at = {now} + :ttl "
                 "WHERE id = 1 AND holder = :node AND epoch = :epoch"),
            {"ttl": ttl, "node": NODE, "epoch": epoch},
        ).rowcount == 1


def renew_with_timer(db: Database, epoch: int, ttl: float) -> bool:
    watchdog = threading.Timer(LOCAL_DEADLINE, lambda: None)
    watchdog.daemon = True
    watchdog.start()
    try:
        return renew_through_request_pool(db, epoch, ttl)
    finally:
        watchdog.cancel()


WAYS: dict[str, Callable[[Database, int, float], bool]] = {
    "lane": lambda db, epoch, ttl: renew(db, NODE, epoch, ttl),
    "pool": renew_through_request_pool,
    "pool+timer": renew_with_timer,
}


def load_writers(db: Database, epoch: int, stop: threading.Event) -> None:
    held = HOLD[db.dialect]
    while not stop.is_set():
        try:
            with db.write() as s:
                assert_holder(s, NODE, epoch)
                time.sleep(held)  # the handler's own work, inside its transaction
        except (Fenced, StoreUnavailable):
            time.sleep(0.02)


def load_gil(db: Database, epoch: int, stop: threading.Event) -> None:
    total = 0
    while not stop.is_set():
        for i in range(1000):
            total += i * i


LOADS = {"writers": load_writers, "gil": load_gil}


def run_case(db: Database, epoch: int, load: str, way: str, seconds: float) -> list[float]:
    """Renewal times (s) under `load`; a failed renewal counts as infinitely late."""
    stop = threading.Event()
    threads = [threading.Thread(target=LOADS[load], args=(db, epoch, stop), daemon=True)
               for _ in range(WORKERS)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # let the load build up
    took: list[float] = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                assert WAYS[way](db, epoch, 30.0)
                took.append(time.monotonic() - t0)
            except StoreUnavailable:
                took.append(float("inf"))
            time.sleep(max(0.0, RENEW_INTERVAL - (time.monotonic() - t0)))
    finally:
        stop.set()
        for t in threads:
            t.join(HOLD[db.dialect] + 10)
    return took


def ms(value: float) -> str:
    return "failed" if value == float("inf") else f"{value * 1000:.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lease_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg", action="store_true", help="PostgreSQL on 127.0.0.1:5432")
    p.add_argument("--seconds", type=float, default=10.0, help="per case (default 10)")
    p.add_argument("--loads", default="writers,gil", help="comma-separated: writers,gil")
    p.add_argument("--ways", default="lane,pool,pool+timer",
                   help="comma-separated: lane,pool,pool+timer")
    p.add_argument("--pool-size", type=int, default=16,
                   help="the request pool's size (DB_POOL_SIZE, default 16; PostgreSQL adds "
                        "a quarter as overflow, so 16 writers do not exhaust it)")
    args = p.parse_args(argv)
    pg_name = create_pg_database() if args.pg else None
    url = pg_url(pg_name) if pg_name else f"sqlite:///{Path(tempfile.mkdtemp()) / 'lease.db'}"
    db = Database(url, pool_size=args.pool_size)
    rows = []
    try:
        db.upgrade()
        epoch = try_acquire(db, NODE, "http://bench", 30.0)
        assert epoch is not None, "a fresh database's lease is free"
        for load in args.loads.split(","):
            for way in args.ways.split(","):
                took = run_case(db, epoch, load, way, args.seconds)
                failed = sum(1 for t in took if t == float("inf"))
                late = sum(1 for t in took if t > LOCAL_DEADLINE)
                rows.append((load, way, len(took), ms(statistics.median(took)),
                             ms(nearest_rank_percentile(took, 99)), ms(max(took)),
                             f"{late} ({failed} failed)"))
                print(f"  {load:8} {way:10} " + "  ".join(map(str, rows[-1][2:])), flush=True)
    finally:
        db.dispose()
        if pg_name:
            drop_pg_database(pg_name)
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nhachat lease renewal benchmark: {db.dialect}, {WORKERS} load threads, request "
          f"pool {args.pool_size}, "
          f"{args.seconds:g} s per case, {os.cpu_count()} CPUs, load average {load_avg}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, src {source_revision()}")
    print(format_table(("load", "renewal", "n", "p50 ms", "p99 ms", "max ms", "late > 1.25 s"),
                       rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
