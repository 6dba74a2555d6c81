"""The fencing lease, judged by the database clock, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from hachat.store import Database, Fenced, StoreError
from hachat.store.lease import (
    GATE,
    LeaseState,
    assert_holder,
    read_lease,
    release,
    renew,
    try_acquire,
)

PG_ONLY = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
URL_A = "http://a.example:8080"
URL_B = "http://b.example:8080"


def wait_until_expired(db: Database, timeout: float = 5.0) -> LeaseState:
    """Poll (by the database clock) until the lease is no longer held."""
    deadline = time.monotonic() + timeout
    while True:
        state = read_lease(db)
        if not state.held:
            return state
        assert time.monotonic() < deadline, f"lease still held: {state}"
        time.sleep(0.02)


def test_fresh_lease_is_free(db):
    state = read_lease(db)
    assert state.holder is None and state.epoch == 0 and state.held is False
    assert state.db_now > 1_600_000_000  # unix seconds from the database's clock
    assert abs(state.db_now - time.time()) < 60


def test_acquire_sets_holder_epoch_and_expiry(db):
    epoch = try_acquire(db, "a", URL_A, 30.0)
    assert epoch == 1
    state = read_lease(db)
    assert state.holder == "a" and state.holder_url == URL_A and state.epoch == 1
    assert state.held
    assert 29.0 < state.expires_at - state.db_now <= 30.0
    assert 29.0 < state.remaining <= 30.0


def test_acquire_fails_while_held_and_succeeds_after_expiry(db):
    assert try_acquire(db, "a", URL_A, 0.2) == 1
    assert try_acquire(db, "b", URL_B, 0.2) is None
    assert try_acquire(db, "a", URL_A, 0.2) is None  # even the holder cannot re-acquire
    wait_until_expired(db)
    assert try_acquire(db, "b", URL_B, 5.0) == 2
    state = read_lease(db)
    assert state.holder == "b" and state.holder_url == URL_B and state.epoch == 2


def test_concurrent_acquire_has_exactly_one_winner(db):
    barrier = threading.Barrier(8)
    results: dict[str, int | None] = {}
    errors: list[BaseException] = []

    def contend(name: str) -> None:
        try:
            barrier.wait(10)
            results[name] = try_acquire(db, name, f"http://{name}", 30.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(f"n{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    winners = {name: epoch for name, epoch in results.items() if epoch is not None}
    assert len(results) == 8
    assert list(winners.values()) == [1]
    assert read_lease(db).holder == next(iter(winners))


def test_renew_extends_and_old_epoch_cannot_renew_after_takeover(db):
    epoch_a = try_acquire(db, "a", URL_A, 0.2)
    assert renew(db, "a", epoch_a, 30.0) is True
    state = read_lease(db)
    assert state.expires_at - state.db_now > 29.0
    assert renew(db, "b", epoch_a, 30.0) is False  # wrong holder
    assert renew(db, "a", epoch_a + 1, 30.0) is False  # wrong epoch
    assert renew(db, "a", epoch_a, 0.2) is True
    wait_until_expired(db)
    epoch_b = try_acquire(db, "b", URL_B, 30.0)
    assert epoch_b == epoch_a + 1
    assert renew(db, "a", epoch_a, 30.0) is False
    assert read_lease(db).holder == "b"


def test_release_lets_another_acquire_immediately(db):
    epoch_a = try_acquire(db, "a", URL_A, 30.0)
    assert release(db, "b", epoch_a) is False
    assert release(db, "a", epoch_a + 1) is False
    assert read_lease(db).held
    assert release(db, "a", epoch_a) is True
    state = read_lease(db)
    assert state.holder is None and state.held is False and state.epoch == epoch_a
    assert release(db, "a", epoch_a) is False
    assert try_acquire(db, "b", URL_B, 30.0) == epoch_a + 1


def test_a_free_lease_tells_how_long_it_has_been_free(db):
    """Released or expired, `free_for` counts from that moment by the database clock (the
    keeper leaves a lease it gave up to a live peer only that long)."""
    assert read_lease(db).free_for > 1_000_000  # never held: free since forever
    epoch = try_acquire(db, "a", URL_A, 30.0)
    assert read_lease(db).free_for == 0.0
    assert release(db, "a", epoch)
    time.sleep(0.3)
    assert 0.25 < read_lease(db).free_for < 5.0
    try_acquire(db, "b", URL_B, 0.2)
    state = wait_until_expired(db)
    assert 0.0 <= state.free_for < 1.0
    time.sleep(0.3)
    assert 0.25 < read_lease(db).free_for < 5.0


def test_reacquire_after_release_raises_epoch(db):
    e1 = try_acquire(db, "a", URL_A, 30.0)
    assert release(db, "a", e1)
    e2 = try_acquire(db, "a", URL_A, 30.0)
    assert e2 == e1 + 1
    assert renew(db, "a", e1, 30.0) is False


def test_assert_holder_passes_for_holder_and_fences_after_takeover(db):
    epoch_a = try_acquire(db, "a", URL_A, 0.2)
    with db.write() as s:
        assert_holder(s, "a", epoch_a)
        s.execute(text("UPDATE stream_meta SET floor = 1 WHERE id = 1"))
    wait_until_expired(db)
    with db.write() as s:
        assert_holder(s, "a", epoch_a)  # expiry alone does not fence: the epoch does
    epoch_b = try_acquire(db, "b", URL_B, 30.0)
    with pytest.raises(Fenced) as info, db.write() as s:
        assert_holder(s, "a", epoch_a)
        s.execute(text("UPDATE stream_meta SET floor = 2 WHERE id = 1"))
    assert isinstance(info.value, StoreError)
    assert info.value.current_epoch == epoch_b and info.value.holder == "b"
    with db.read() as s:  # the fenced write was rolled back
        assert s.execute(text("SELECT floor FROM stream_meta")).scalar() == 1
    with db.write() as s:
        assert_holder(s, "b", epoch_b)
    with pytest.raises(Fenced), db.write() as s:
        assert_holder(s, "b", epoch_a)


def test_assert_holder_fences_when_nobody_holds(db):
    with pytest.raises(Fenced), db.write() as s:
        assert_holder(s, "a", 0)


def _active_lock_waits(db: Database) -> int:
    with db.read() as s:
        return s.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND (query ILIKE '%FROM lease%FOR UPDATE%' "
            "OR query ILIKE '%pg_advisory_xact_lock%')"
        )).scalar()


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@PG_ONLY
def test_takeover_waits_for_writer_in_flight(db):
    """PostgreSQL: a takeover blocks on the lock an in-flight writer's assert_holder took;
    the old epoch's write commits first, and the next write under the old epoch is fenced."""
    epoch_a = try_acquire(db, "a", URL_A, 0.3)
    order: list[str] = []
    writer_locked = threading.Event()
    writer_may_commit = threading.Event()
    results: dict[str, object] = {}

    def writer() -> None:
        try:
            with db.write() as s:
                assert_holder(s, "a", epoch_a)
                writer_locked.set()
                writer_may_commit.wait(20)
                s.execute(text("UPDATE stream_meta SET floor = 7 WHERE id = 1"))
            order.append("writer committed")
        except BaseException as exc:  # noqa: BLE001 - checked below
            results["writer"] = exc

    def takeover() -> None:
        try:
            results["epoch"] = try_acquire(db, "b", URL_B, 30.0)
            # What the takeover finds right after it: the old epoch's write, committed. (The
            # two threads' appends to `order` may land either way round once both are done.)
            with db.read() as s:
                results["floor_after_takeover"] = s.execute(
                    text("SELECT floor FROM stream_meta")).scalar()
            order.append("takeover done")
        except BaseException as exc:  # noqa: BLE001 - checked below
            results["takeover"] = exc

    w = threading.Thread(target=writer)
    w.start()
    assert writer_locked.wait(10)
    wait_until_expired(db)  # the lease has expired by the db clock; the writer is still open
    t = threading.Thread(target=takeover)
    t.start()
    _wait_for(lambda: _active_lock_waits(db) == 1)  # the takeover is blocked on the gate
    assert order == []
    writer_may_commit.set()
    w.join(20)
    t.join(20)
    assert "writer" not in results and "takeover" not in results, results
    assert sorted(order) == ["takeover done", "writer committed"]
    assert results["floor_after_takeover"] == 7  # the takeover waited for the writer
    assert results["epoch"] == epoch_a + 1
    with db.read() as s:
        assert s.execute(text("SELECT floor FROM stream_meta")).scalar() == 7
    with pytest.raises(Fenced), db.write() as s:
        assert_holder(s, "a", epoch_a)


@PG_ONLY
def test_writer_arriving_during_takeover_waits_then_is_fenced(db):
    """PostgreSQL: a writer that starts while a takeover holds the row waits for it and then
    sees the new epoch (no write under the old epoch after the new one is granted)."""
    epoch_a = try_acquire(db, "a", URL_A, 0.2)
    wait_until_expired(db)
    outcome: dict[str, object] = {}
    writer_started = threading.Event()

    def late_writer() -> None:
        writer_started.set()
        try:
            with db.write() as s:
                assert_holder(s, "a", epoch_a)
            outcome["result"] = "wrote"
        except Fenced as exc:
            outcome["result"] = exc

    with db.write() as s:  # a takeover in progress, done by hand to hold it open
        s.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                  {"ns": GATE[0], "key": GATE[1]})
        s.execute(text("SELECT id FROM lease WHERE id = 1 FOR UPDATE"))
        w = threading.Thread(target=late_writer)
        w.start()
        assert writer_started.wait(10)

        def writer_waits() -> bool:
            with db.read() as r:
                return r.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' "
                    "AND query ILIKE '%pg_advisory_xact_lock_shared%'"
                )).scalar() == 1

        _wait_for(writer_waits)
        s.execute(text("UPDATE lease SET epoch = epoch + 1, holder = 'b' WHERE id = 1"))
    w.join(20)
    assert isinstance(outcome["result"], Fenced)


@PG_ONLY
def test_renew_is_not_blocked_by_own_writers(db):
    """PostgreSQL: writers hold only the advisory gate (shared), so the holder's renewals
    never queue behind its own in-flight writes."""
    epoch = try_acquire(db, "a", URL_A, 30.0)
    with db.write() as s:
        assert_holder(s, "a", epoch)
        start = time.monotonic()
        assert renew(db, "a", epoch, 30.0) is True
        assert time.monotonic() - start < 2.0  # lock_timeout would have raised at 5 s
        assert release(db, "b", epoch) is False


def test_lease_state_held_property():
    assert LeaseState("a", None, 1, 10.0, 5.0).held is True
    assert LeaseState("a", None, 1, 5.0, 5.0).held is False
    assert LeaseState(None, None, 1, 10.0, 5.0).held is False
    assert LeaseState(None, None, 1, 10.0, 5.0).remaining == 0.0
