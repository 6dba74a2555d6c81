"""The lease keeper's control lane (`Database.control`) and SQLite's write turns."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from hachat.store import Database, StoreUnavailable
from hachat.store.lease import read_lease, renew, try_acquire
from hachat.store.turns import WriteTurns

URL_A = "http://a.example:8080"
PG_ONLY = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)


# -- WriteTurns ---------------------------------------------------------------------------------

def test_turns_are_exclusive_and_taken_in_arrival_order():
    turns = WriteTurns()
    order: list[int] = []
    inside = [0]
    overlap: list[int] = []

    def writer(n: int) -> None:
        with turns.turn(5.0):
            inside[0] += 1
            if inside[0] > 1:
                overlap.append(n)
            order.append(n)
            time.sleep(0.01)
            inside[0] -= 1

    with turns.turn(5.0):
        threads = []
        for n in range(5):
            t = threading.Thread(target=writer, args=(n,))
            t.start()
            threads.append(t)
            time.sleep(0.02)  # let each one queue before the next
    for t in threads:
        t.join(10)
    assert overlap == []
    assert order == [0, 1, 2, 3, 4]
    assert turns.busy is False


def test_an_urgent_turn_goes_right_after_the_one_in_progress():
    turns = WriteTurns()
    order: list[str] = []

    def take(name: str, urgent: bool) -> None:
        with turns.turn(5.0, urgent=urgent):
            order.append(name)

    with turns.turn(5.0):
        queued = [threading.Thread(target=take, args=(f"w{n}", False)) for n in range(4)]
        for t in queued:
            t.start()
        time.sleep(0.05)
        keeper = threading.Thread(target=take, args=("keeper", True))
        keeper.start()
        time.sleep(0.05)
    for t in [*queued, keeper]:
        t.join(10)
    assert order[0] == "keeper", order
    assert sorted(order[1:]) == ["w0", "w1", "w2", "w3"]


def test_a_turn_not_given_in_time_is_store_unavailable_and_passed_on():
    turns = WriteTurns()
    got: list[str] = []
    release = threading.Event()

    def holder() -> None:
        with turns.turn(5.0):
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="no write turn"), turns.turn(0.1):
        pass
    assert 0.09 < time.monotonic() - started < 2
    with pytest.raises(StoreUnavailable), turns.turn(0.1, urgent=True):
        pass
    release.set()
    t.join(10)
    with turns.turn(1.0):  # nothing was left taken
        got.append("ok")
    assert got == ["ok"]


# -- the control lane ---------------------------------------------------------------------------

def test_control_lane_runs_statements_and_transactions(db):
    lane = db.control
    assert lane.dialect == db.dialect
    assert lane.run("SELECT epoch FROM lease WHERE id = :id", {"id": 1}, write=False).rows == [(0,)]
    assert lane.run("UPDATE lease SET epoch = :e WHERE id = :id", {"e": 3, "id": 1},
                    write=True).rowcount == 1
    with pytest.raises(RuntimeError), lane.transaction() as run:
        run("UPDATE lease SET epoch = :e WHERE id = :id", {"e": 9, "id": 1})
        raise RuntimeError("rolled back")
    with lane.transaction() as run:
        assert run("SELECT epoch FROM lease WHERE id = :id", {"id": 1}).first() == (3,)
    with db.read() as s:  # the request pool sees what the control lane committed
        assert s.execute(text("SELECT epoch FROM lease")).scalar() == 3


def test_renewal_does_not_wait_for_the_request_pool(db_url, backend):
    """Every request connection is taken (PostgreSQL) or a writer holds the write turn with
    others queued behind it (SQLite): a renewal still completes at once, or right after the
    write in progress."""
    db = Database(db_url, pool_size=2, lock_timeout=3.0)
    postgres = backend == "postgresql"
    # PostgreSQL: pool_size 2 + overflow 2: four open transactions take every connection.
    # SQLite: one writer holds the turn for `held` s; three more queue behind it.
    held = 10.0 if postgres else 0.3
    inside = threading.Semaphore(0)
    done = threading.Event()
    threads: list[threading.Thread] = []
    try:
        epoch = try_acquire(db, "a", URL_A, 30.0)

        def occupy() -> None:
            try:
                with (db.read if postgres else db.write)() as s:
                    s.execute(text("SELECT 1"))
                    inside.release()
                    done.wait(held)
            except StoreUnavailable:
                pass

        for _ in range(4):
            threads.append(threading.Thread(target=occupy))
            threads[-1].start()
        for _ in range(4 if postgres else 1):
            assert inside.acquire(timeout=10)
        time.sleep(0.05)  # the others are queued now
        started = time.monotonic()
        assert renew(db, "a", epoch, 30.0) is True
        took = time.monotonic() - started
        # SQLite: after the one write in progress, not after the three queued (>= 0.9 s).
        assert took < (1.0 if postgres else 0.3 + 0.4), took
        assert read_lease(db).holder == "a"
    finally:
        done.set()
        for t in threads:
            t.join(15)
        db.dispose()


@PG_ONLY
def test_control_connections_are_named_and_separate(db):
    try_acquire(db, "a", URL_A, 30.0)
    with db.read() as s:
        names = s.execute(text(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")).scalars().all()
    assert "hachat-lease" in names


@PG_ONLY
def test_a_control_connection_killed_by_the_server_is_replaced(db):
    epoch = try_acquire(db, "a", URL_A, 30.0)
    with db.read() as s:
        killed = s.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'hachat-lease'"
        )).scalar()
    assert killed >= 1
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(renew(db, "a", epoch, 30.0))
        except StoreUnavailable:
            outcomes.append("unavailable")
    assert outcomes[-1] is True, outcomes  # at most one call fails, then it reconnects


def test_sqlite_renewal_waits_for_another_process_only_up_to_busy_timeout(tmp_path):
    import sqlite3

    path = tmp_path / "h.db"
    db = Database(f"sqlite:///{path}", pool_size=2, lock_timeout=0.3)
    try:
        db.upgrade()
        epoch = try_acquire(db, "a", URL_A, 30.0)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(StoreUnavailable):
                renew(db, "a", epoch, 30.0)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert renew(db, "a", epoch, 30.0) is True
    finally:
        db.dispose()
