"""EventHub under concurrent writers: the horizon never lets a reader skip a late commit, and
long-poll clients following the handler protocol get every event once, in order."""

from __future__ import annotations

import random
import threading
import time

import pytest
from loop_fixture import CountingRender, Parked, RealLoop, body

from hachat.realtime import Event, EventHub

WRITERS = 8
PER_WRITER = 500


class FakeDb:
    """Committed event rows by position, plus the positions still in flight (reserved,
    neither committed nor abandoned) to check the horizon against."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: dict[int, Event] = {}
        self.in_flight: set[int] = set()

    def query(self, after: int, upto: int, match=None) -> list[Event]:
        with self.lock:
            assert not any(p <= upto for p in self.in_flight), "horizon passed an open write"
            rows = [self.rows[p] for p in range(after + 1, upto + 1) if p in self.rows]
        return [e for e in rows if match is None or match(e)]


def writer(hub: EventHub, db: FakeDb, seed: int, errors: list) -> None:
    rnd = random.Random(seed)
    try:
        for _ in range(PER_WRITER):
            with hub.reservation() as r:
                with db.lock:
                    db.in_flight.add(r.position)
                x = rnd.random()
                if x < 0.3:
                    time.sleep(0)  # let another writer overtake this one
                elif x < 0.32:
                    time.sleep(0.002)  # a slow transaction
                if rnd.random() < 0.05:  # rolled back
                    with db.lock:
                        db.in_flight.discard(r.position)
                    continue
                g = rnd.choice((1, 2, 3, 5))
                user = 7 if g == 5 else None  # "member added" style: group 5, for user 7
                e = Event(r.position, "message.created", g, user, {"w": seed}, "now")
                with db.lock:  # the commit
                    db.rows[r.position] = e
                    db.in_flight.discard(r.position)
                r.event = e
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def run_writers(hub: EventHub, db: FakeDb, errors: list) -> list[threading.Thread]:
    threads = [threading.Thread(target=writer, args=(hub, db, i, errors)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    return threads


@pytest.fixture
def loop():
    lp = RealLoop().start()
    yield lp
    lp.stop()
    assert not lp.errors, lp.errors[0]


def test_reader_never_skips_an_event_and_sees_each_once_in_order(loop):
    hub = EventHub(loop)
    hub.reset(0)
    db = FakeDb()
    errors: list = []
    threads = run_writers(hub, db, errors)
    seen: list[int] = []
    cursor = 0
    reads = 0
    out_of_order = 0
    while True:
        writing = any(t.is_alive() for t in threads)
        out_of_order = max(out_of_order, hub.stats()["completed_above_visible"])
        upto = hub.visible_position()
        rows = db.query(cursor, upto)
        reads += 1
        seen.extend(e.position for e in rows)
        cursor = upto
        if not writing:
            break
    for t in threads:
        t.join()
    assert not errors, errors
    rows = db.query(cursor, hub.visible_position())
    seen.extend(e.position for e in rows)
    assert hub.visible_position() == WRITERS * PER_WRITER
    assert seen == sorted(db.rows), "an event was skipped, repeated or reordered"
    assert len(seen) == len(set(seen))
    assert reads > 10
    assert out_of_order > 0, "commits never overtook each other: the test proved nothing"
    assert hub.stats()["in_flight"] == 0


def test_long_poll_clients_get_every_event_once_in_order(loop):
    hub = EventHub(loop)
    hub.reset(0)
    db = FakeDb()
    render = CountingRender()
    clients = {7: {1}, 8: {2, 3}, 9: {4}}
    got: dict[int, list[int]] = {u: [] for u in clients}
    done = threading.Event()
    errors: list = []

    def matches(user: int, groups: set[int]):
        return lambda e: e.group_id in groups or e.target_user_id == user

    def client(user: int) -> None:
        groups = clients[user]
        match = matches(user, groups)
        cursor = 0
        try:
            while True:
                finished = done.is_set()
                upto = hub.visible_position()  # BEFORE the query
                rows = db.query(cursor, upto, match)
                if rows:
                    got[user].extend(e.position for e in rows)
                    cursor = upto
                    continue
                if finished:
                    return
                d = hub.wait(user, groups, since=cursor, seen_upto=upto, timeout=0.1,
                             render=render)
                if d is None:  # the buffer no longer reaches back: query again
                    continue
                answer = body(Parked(loop, d).response(5))
                got[user].extend(e["id"] for e in answer["events"])
                if answer["events"]:
                    assert answer["cursor"] == answer["events"][-1]["id"]
                else:
                    assert answer["cursor"] == cursor
                cursor = answer["cursor"]
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=client, args=(u,)) for u in clients]
    for t in readers:
        t.start()
    threads = run_writers(hub, db, errors)
    for t in threads:
        t.join()
    done.set()
    for t in readers:
        t.join(30)
    assert not errors, errors
    for user, groups in clients.items():
        expected = [p for p, e in sorted(db.rows.items()) if matches(user, groups)(e)]
        assert got[user] == expected, f"user {user}"
    assert got[7] and got[8] and not got[9]
    loop.flush()
    s = hub.stats()
    assert (s["waiters"], s["groups"], s["users"], s["in_flight"]) == (0, 0, 0, 0)
