"""EventHub: positions, the visible horizon, wait/fan-out, cleanup."""

from __future__ import annotations

import time

import pytest
from loop_fixture import CountingRender, FakeLoop, Parked, RealLoop, attach_many, body

from hachat.http.messages import json_response
from hachat.realtime import Event, EventHub, Ticket


def ev(position: int, group: int | None = 1, user: int | None = None,
       kind: str = "message.created") -> Event:
    return Event(position, kind, group, user, {"n": position}, "2024-01-01T00:00:00Z")


def publish(hub: EventHub, group: int | None = 1, user: int | None = None) -> Event:
    with hub.reservation() as r:
        event = ev(r.position, group, user)
        r.event = event
    return event


def zero_stats(hub: EventHub) -> bool:
    s = hub.stats()
    return (s["waiters"], s["groups"], s["users"]) == (0, 0, 0) and not hub._by_group \
        and not hub._by_user


@pytest.fixture
def loop():
    lp = RealLoop().start()
    yield lp
    lp.stop()
    assert not lp.errors, lp.errors[0]


@pytest.fixture
def hub(loop):
    h = EventHub(loop)
    h.reset(0)
    return h


# -- positions ---------------------------------------------------------------------------
def test_visible_never_passes_an_in_flight_reservation(hub):
    t1, t2, t3 = hub.reserve(), hub.reserve(), hub.reserve()
    assert (t1.position, t2.position, t3.position) == (1, 2, 3)
    assert hub.stats()["in_flight"] == 3
    hub.complete(t3, ev(3))
    assert hub.visible_position() == 0
    hub.complete(t2, ev(2))
    assert hub.visible_position() == 0
    assert hub.stats()["in_flight"] == 1
    hub.complete(t1, ev(1))
    assert hub.visible_position() == 3
    assert [e.position for e in hub._buffer] == [1, 2, 3]

    # abandoned tickets (rolled back) don't block the horizon and leave a hole
    t4, t5, t6 = hub.reserve(), hub.reserve(), hub.reserve()
    hub.complete(t6, ev(6))
    hub.complete(t4, None)
    assert hub.visible_position() == 4
    hub.complete(t5, None)
    assert hub.visible_position() == 6
    assert [e.position for e in hub._buffer] == [1, 2, 3, 6]
    assert hub.stats()["in_flight"] == 0


def test_reserve_before_reset_is_refused():
    with pytest.raises(RuntimeError):
        EventHub(FakeLoop()).reserve()


def test_reset_starts_after_last_position_and_ignores_old_generation():
    lp = FakeLoop()
    hub = EventHub(lp)
    hub.reset(10)
    old = hub.reserve()
    assert old == Ticket(11, 1)
    hub.reset(20)
    assert hub.visible_position() == 20
    hub.complete(old, ev(11))  # a writer of the previous term finishing late
    assert hub.visible_position() == 20
    assert len(hub._buffer) == 0
    assert not lp.queue
    t = hub.reserve()
    assert t.position == 21 and t.generation == 2
    hub.complete(t, ev(21))
    assert hub.visible_position() == 21


def test_handed_out_positions_include_those_above_the_horizon():
    hub = EventHub(FakeLoop())
    assert not hub.handed_out(1)  # never active: nothing handed out
    hub.reset(10)
    assert hub.handed_out(10) and not hub.handed_out(11)
    slow, fast = hub.reserve(), hub.reserve()
    hub.complete(fast, ev(12))
    assert hub.visible_position() == 10
    assert hub.handed_out(12) and not hub.handed_out(13)  # 12 is committed, 11 in flight
    hub.complete(slow, None)
    assert hub.visible_position() == 12


def test_complete_checks_position_and_ignores_duplicates(hub):
    t = hub.reserve()
    with pytest.raises(ValueError):
        hub.complete(t, ev(t.position + 1))
    hub.complete(t, ev(t.position))
    hub.complete(t, ev(t.position))  # duplicate: ignored
    assert [e.position for e in hub._buffer] == [1]
    assert hub.visible_position() == 1


def test_reservation_context_manager(hub):
    publish(hub)
    assert hub.visible_position() == 1
    with pytest.raises(KeyError), hub.reservation() as r:  # rolled back before commit
        raise KeyError("boom")
    assert hub.visible_position() == 2
    assert len(hub._buffer) == 1
    with pytest.raises(KeyError), hub.reservation() as r:  # committed, then failed later
        r.event = ev(r.position)
        raise KeyError("after commit")
    assert hub.visible_position() == 3
    assert [e.position for e in hub._buffer] == [1, 3]


# -- wait ----------------------------------------------------------------------------------
def test_event_visible_between_query_and_wait_is_delivered_at_once(loop, hub):
    render = CountingRender()
    upto = hub.visible_position()  # the handler's query covered (0, upto]
    publish(hub, group=2)  # visible meanwhile, other group
    e = publish(hub, group=1)  # visible meanwhile, our group
    d = hub.wait(5, {1}, since=0, seen_upto=upto, timeout=5, render=render)
    assert d is not None
    resp = Parked(loop, d).response(1)
    assert body(resp) == {"events": [e.to_json_obj()], "cursor": e.position}
    loop.flush()
    assert zero_stats(hub)


def test_event_visible_before_fanout_ran_is_not_delivered_twice():
    lp = FakeLoop()
    hub = EventHub(lp)
    hub.reset(0)
    render = CountingRender()
    e = publish(hub)
    assert len(lp.queue) == 1  # fan-out not run yet
    d = hub.wait(5, {1}, since=0, seen_upto=0, timeout=5, render=render)
    sent = []
    assert d._attach(lp, sent.append) is not None
    lp.run_pending()
    assert sent == [] and render.calls == 1
    assert body(d._early)["events"] == [e.to_json_obj()]
    assert zero_stats(hub)


def test_matching_by_group_and_by_target_user(loop, hub):
    r_member, r_target, r_other, r_outsider = (CountingRender() for _ in range(4))
    upto = hub.visible_position()
    member = Parked(loop, hub.wait(1, {10, 11}, 0, upto, 5, r_member))
    target = Parked(loop, hub.wait(2, {12}, 0, upto, 5, r_target))
    other = Parked(loop, hub.wait(3, {12}, 0, upto, 5, r_other))
    outsider = Parked(loop, hub.wait(4, set(), 0, upto, 5, r_outsider))
    assert hub.stats()["waiters"] == 4

    e1 = publish(hub, group=11)
    assert body(member.response(1))["events"] == [e1.to_json_obj()]
    e2 = publish(hub, group=None, user=2)  # e.g. a notification for user 2 only
    assert body(target.response(1)) == {"events": [e2.to_json_obj()], "cursor": e2.position}
    assert body(target.response())["events"][0]["userId"] == 2
    loop.flush()
    # waiters of other groups and non-members were neither woken nor rendered for
    assert not other.sent.is_set() and not outsider.sent.is_set()
    assert r_other.calls == 0 and r_outsider.calls == 0
    assert hub.stats()["waiters"] == 2
    other.cancel()
    outsider.cancel()
    assert zero_stats(hub)


def test_event_matching_by_group_and_user_is_delivered_once(loop, hub):
    p = Parked(loop, hub.wait(1, {10}, 0, 0, 5, CountingRender()))
    e = publish(hub, group=10, user=1)
    assert body(p.response(1))["events"] == [e.to_json_obj()]


def test_batch_of_events_delivered_in_order_with_last_cursor():
    lp = FakeLoop()
    hub = EventHub(lp)
    hub.reset(100)
    render = CountingRender()
    d = hub.wait(1, {10}, 90, 100, 5, render)
    sent = []
    assert d._attach(lp, sent.append) is None
    tickets = [hub.reserve() for _ in range(5)]
    events = [ev(t.position, group=(10 if t.position % 2 else 20)) for t in tickets]
    for t, e in reversed(list(zip(tickets, events, strict=True))):
        hub.complete(t, e)  # commit in reverse order: one batch becomes visible
    assert len(lp.queue) == 1
    lp.run_pending()
    got = body(sent[0])
    assert [x["id"] for x in got["events"]] == [101, 103, 105]
    assert got["cursor"] == 105
    assert zero_stats(hub)


def test_timeout_returns_same_cursor_and_no_events(loop, hub):
    publish(hub, group=2)
    render = CountingRender()
    p = Parked(loop, hub.wait(1, {1}, since=0, seen_upto=1, timeout=0.05, render=render))
    t0 = time.monotonic()
    assert body(p.response(2)) == {"events": [], "cursor": 0}
    assert time.monotonic() - t0 >= 0.04
    assert zero_stats(hub)


def test_cancel_removes_waiter_and_empty_index_entries(loop, hub):
    ps = [Parked(loop, hub.wait(u, {1, 2, u + 100}, 0, 0, 30, CountingRender()))
          for u in range(5)]
    s = hub.stats()
    assert (s["waiters"], s["groups"], s["users"]) == (5, 7, 5)
    for p in ps:
        p.cancel()
    assert zero_stats(hub)
    publish(hub)
    loop.flush()
    assert not any(p.sent.is_set() for p in ps)


def test_many_wait_cancel_and_timeout_cycles_leave_nothing_behind():
    lp = FakeLoop()
    hub = EventHub(lp)
    hub.reset(0)
    render = CountingRender()
    for i in range(10_000):
        d = hub.wait(i % 97, {i % 13, i % 7 + 50}, 0, 0, 30, render)
        d._attach(lp, lambda r: None)
        if i % 2:
            d._cancel()
        else:
            assert body(d._expire()) == {"events": [], "cursor": 0}
    assert zero_stats(hub)
    assert hub.stats()["waiters"] == 0


def test_close_all_answers_everyone_until_reset(loop, hub):
    ps = [Parked(loop, hub.wait(u, {1}, 0, 0, 30, CountingRender())) for u in range(3)]
    gone = json_response(503, {"error": "not_active"})
    assert hub.close_all(gone) == 3
    assert all(p.response(1) is gone for p in ps)
    assert zero_stats(hub)
    late = Parked(loop, hub.wait(9, {1}, 0, 0, 30, CountingRender()))  # raced the demotion
    assert late.response(1) is gone
    assert hub.stats()["waiters"] == 0
    hub.reset(50)
    p = Parked(loop, hub.wait(9, {1}, 50, 50, 30, CountingRender()))
    assert hub.stats()["waiters"] == 1
    e = publish(hub)
    assert body(p.response(1))["events"] == [e.to_json_obj()]


def test_end_session_answers_that_sessions_waiters_only_and_refuses_a_late_one(loop, hub):
    laptop = Parked(loop, hub.wait(7, {1}, 0, 0, 30, CountingRender(), session="tok-a"))
    phone = Parked(loop, hub.wait(7, {1}, 0, 0, 30, CountingRender(), session="tok-b"))
    other = Parked(loop, hub.wait(8, {1}, 0, 0, 30, CountingRender(), session="tok-a"))
    gone = json_response(401, {"error": "unauthorized"})
    assert hub.end_session(7, "tok-a", gone) == 1
    assert laptop.response(1) is gone
    assert hub.stats()["waiters"] == 2
    # a poll that authenticated before the logout and parks after it is refused at once
    late = Parked(loop, hub.wait(7, {1}, 0, 0, 30, CountingRender(), session="tok-a"))
    assert late.response(1) is gone
    assert hub.stats()["waiters"] == 2
    hub.reset(0)  # an ended session stays ended when the node becomes active again
    again = Parked(loop, hub.wait(7, {1}, 0, 0, 30, CountingRender(), session="tok-a"))
    assert again.response(1) is gone
    assert phone.response(1) is not gone and other.response(1) is not gone  # reset: re-query


def test_reset_answers_parked_waiters_with_their_cursor(loop, hub):
    render = CountingRender()
    p = Parked(loop, hub.wait(1, {1}, 0, 0, 30, render))
    hub.reset(40)  # events 1..40 were written by the other node: the waiter must re-query
    assert body(p.response(1)) == {"events": [], "cursor": 0}
    assert zero_stats(hub)


def test_an_uncertain_commit_sends_readers_below_it_to_the_database(loop, hub):
    """A position whose COMMIT answer was lost may be stored: once the horizon passes it,
    nobody parked below it gets later events from the hub (they would skip it)."""
    render = CountingRender()
    slow, lost, later = hub.reserve(), hub.reserve(), hub.reserve()
    p = Parked(loop, hub.wait(1, {1}, 0, 0, 30, render))
    hub.complete(lost, None, uncertain=True)
    hub.complete(later, ev(3))
    loop.flush()
    assert not p.sent.is_set()  # nothing visible yet: 1 is in flight
    hub.complete(slow, ev(1))  # 1, 2 (uncertain) and 3 become visible together
    assert body(p.response(1)) == {"events": [], "cursor": 0}  # re-read the database
    assert hub.visible_position() == 3 and hub.head_position() == 3
    assert hub.wait(1, {1}, 0, 0, 30, render) is None  # a late poll below it re-reads too
    fresh = Parked(loop, hub.wait(1, {1}, 0, 3, 30, render))  # read past it: waits as usual
    publish(hub)
    assert [e["id"] for e in body(fresh.response(1))["events"]] == [4]
    with pytest.raises(ValueError):
        hub.complete(hub.reserve(), ev(5), uncertain=True)


def test_buffer_eviction_makes_wait_return_none():
    lp = FakeLoop()
    hub = EventHub(lp, buffer_size=3)
    hub.reset(0)
    for _ in range(5):
        publish(hub)
    lp.run_pending()
    assert [e.position for e in hub._buffer] == [3, 4, 5]
    render = CountingRender()
    assert hub.wait(1, {1}, 0, 0, 5, render) is None
    assert hub.wait(1, {1}, 1, 1, 5, render) is None
    d = hub.wait(1, {1}, 2, 2, 5, render)  # 3.. are all still buffered
    assert d is not None
    assert [x["id"] for x in body(d._early)["events"]] == [3, 4, 5]
    assert hub.stats()["waiters"] == 0
    # a reset empties the buffer: cursors from before it must re-query
    hub.reset(5)
    assert hub.wait(1, {1}, 4, 4, 5, render) is None
    assert hub.wait(1, {1}, 5, 5, 5, render) is not None


def test_render_failure_answers_500_and_still_delivers_to_others(loop, hub):
    def bad(events, cursor):
        raise RuntimeError("render bug")

    good = CountingRender()
    p_bad = Parked(loop, hub.wait(1, {1}, 0, 0, 30, bad))
    p_good = Parked(loop, hub.wait(2, {1}, 0, 0, 30, good))
    publish(hub)
    assert p_bad.response(1).status == 500
    assert p_good.response(1).status == 200
    assert zero_stats(hub)


def test_fanout_to_5000_waiters_renders_one_body(loop, hub):
    render = CountingRender()
    n = 5000
    deferreds = [hub.wait(u, {1, 1000 + u % 50}, 0, 0, 60, render) for u in range(n)]
    parked = attach_many(loop, deferreds)
    # and some waiters elsewhere that must not be woken
    others = attach_many(loop, [hub.wait(u, {2}, 0, 0, 60, render) for u in range(n, n + 100)])
    timings = []
    fanout = hub._fanout

    def timed():
        t0 = time.perf_counter()
        fanout()
        timings.append(time.perf_counter() - t0)

    hub._fanout = timed
    e = publish(hub, group=1)
    responses = [p.response(10) for p in parked]
    assert render.calls == 1
    first = responses[0]
    assert all(r is first for r in responses)
    assert body(first) == {"events": [e.to_json_obj()], "cursor": e.position}
    assert not any(p.sent.is_set() for p in others)
    s = hub.stats()
    assert (s["waiters"], s["groups"], s["users"]) == (100, 1, 100)
    print(f"\nfan-out of 1 event to {n} waiters (2 groups each): "
          f"{timings[0] * 1000:.1f} ms of loop time")
    for p in others:
        p.cancel()
    assert zero_stats(hub)


@pytest.mark.parametrize("seed", range(20))
def test_fanout_matches_brute_force(seed):
    """Random waiters (groups, users, cursors) and random batches, against a brute force."""
    import random

    rnd = random.Random(seed)
    lp = FakeLoop()
    hub = EventHub(lp)
    hub.reset(100)
    render = CountingRender()
    waiters = []  # (user, groups, seen_upto, sent list)
    for _ in range(60):
        if rnd.random() < 0.3:  # advance the horizon with an event nobody watches
            publish(hub, group=999)
            lp.run_pending()
        user = rnd.randrange(8)
        groups = set(rnd.sample(range(10), rnd.randrange(0, 7)))
        upto = hub.visible_position()
        d = hub.wait(user, groups, upto, upto, 30, render)
        sent: list = []
        assert d._attach(lp, sent.append) is None
        waiters.append((user, groups, upto, sent))
    n = rnd.choice((1, 1, 2, 5))
    tickets = [hub.reserve() for _ in range(n)]
    events = []
    for t in tickets:
        kind = rnd.random()
        if kind < 0.15:
            events.append(None)  # rolled back
        else:
            g = rnd.randrange(10) if kind < 0.8 else None
            u = rnd.randrange(8) if kind > 0.6 else None
            events.append(ev(t.position, group=g, user=u))
    order = list(range(n))
    rnd.shuffle(order)
    for i in order:
        hub.complete(tickets[i], events[i])
    lp.run_pending()
    for user, groups, upto, sent in waiters:
        expected = [e.to_json_obj() for e in events if e is not None and e.position > upto
                    and (e.group_id in groups or e.target_user_id == user)]
        if expected:
            assert len(sent) == 1
            assert body(sent[0]) == {"events": expected, "cursor": expected[-1]["id"]}
        else:
            assert sent == []
    still = sum(1 for *_, sent in waiters if not sent)
    s = hub.stats()
    assert s["waiters"] == still
    assert s["users"] == len({u for u, _, _, sent in waiters if not sent})
    assert s["groups"] == len({g for _, gs, _, sent in waiters if not sent for g in gs})
    assert all(hub._by_group.values()) and all(hub._by_user.values())


def test_head_position_never_rests_on_an_abandoned_position():
    """Regression: GET /events without a cursor handed out visible_position(), which can be a
    position whose transaction rolled back. A node taking over reuses such numbers (it starts
    after the database's highest row), so a client holding it would skip a new event."""
    loop = FakeLoop()
    hub = EventHub(loop)
    hub.reset(10)
    committed = hub.reserve()
    abandoned = hub.reserve()
    hub.complete(committed, Event(committed.position, "message.created", 1, None, {}, "t"))
    hub.complete(abandoned, None)
    assert hub.visible_position() == 12
    assert hub.head_position() == 11


# -- sliced delivery -----------------------------------------------------------------------
def park_fake(lp: FakeLoop, hub: EventHub, user: int, groups: set[int], upto: int,
              render: CountingRender) -> list:
    """A waiter attached to the fake loop; returns the list its answers land in."""
    sent: list = []
    d = hub.wait(user, groups, upto, upto, 30, render)
    assert d is not None and d._attach(lp, sent.append) is None
    return sent


def test_a_big_fanout_is_answered_in_slices_with_the_loop_running_between():
    lp = FakeLoop()
    hub = EventHub(lp, slice_seconds=0.0)  # every slice ends after its first step
    hub.reset(0)
    render = CountingRender()
    n = 300
    boxes = [park_fake(lp, hub, u, {1, 2}, 0, render) for u in range(n)]
    e1 = publish(hub, group=1)
    assert len(lp.queue) == 1
    lp.queue.popleft()[0]()  # the fan-out: matches everyone, answers the first slice
    answered = sum(1 for b in boxes if b)
    assert 0 < answered < n
    assert hub.stats()["waiters"] == 0  # matched waiters leave the index at once
    assert hub.stats()["undelivered"] == n - answered
    assert [fn for fn, _ in lp.queue] == [hub._drain]  # the next slice
    ran = []
    lp.call_soon_threadsafe(ran.append, "other work")  # e.g. the poster's own answer
    lp.queue.popleft()[0]()
    assert answered < sum(1 for b in boxes if b) < n
    # the slice after that is queued behind the other work, which runs first
    assert [fn for fn, _ in lp.queue] == [ran.append, hub._drain]
    fn, args = lp.queue.popleft()
    fn(*args)
    assert ran == ["other work"] and hub.stats()["undelivered"] > 0
    # An event that becomes visible while the first is still being answered: the waiters
    # still queued get exactly the first (they are not in the index any more), and those
    # already answered, parked again from its cursor, get the second.
    again = [park_fake(lp, hub, u, {1, 2}, e1.position, render)
             for u, b in enumerate(boxes) if b]
    e2 = publish(hub, group=2)
    lp.run_pending()
    assert hub.stats()["undelivered"] == 0
    for b in boxes:
        assert [body(r) for r in b] == [{"events": [e1.to_json_obj()], "cursor": e1.position}]
    for b in again:
        assert [body(r) for r in b] == [{"events": [e2.to_json_obj()], "cursor": e2.position}]
    assert render.calls == 2  # one body per event, shared by every waiter
    assert zero_stats(hub)


def test_a_connection_that_fails_while_answered_does_not_strand_the_rest():
    lp = FakeLoop()
    hub = EventHub(lp, slice_seconds=0.0)
    hub.reset(0)
    render = CountingRender()
    boxes = []
    for u in range(200):
        sent: list = []
        d = hub.wait(u, {1}, 0, 0, 30, render)
        if u == 3:
            def broken(response, sent=sent):
                raise OSError("the connection broke while being answered")
            d._attach(lp, broken)
        else:
            d._attach(lp, sent.append)
        boxes.append(sent)
    publish(hub)
    lp.run_pending()
    assert [len(b) for b in boxes] == [0 if u == 3 else 1 for u in range(200)]
    assert hub.stats()["undelivered"] == 0
    assert zero_stats(hub)


def test_finished_long_polls_leave_no_cyclic_garbage():
    """A waiter and its Deferred point at each other until the wait ends; after that they are
    freed by reference counting, not left for the cyclic garbage collector (whose full passes
    scan every parked request of a busy server)."""
    import gc

    lp = FakeLoop()
    hub = EventHub(lp)
    hub.reset(0)
    render = CountingRender()
    gc.collect()
    gc.disable()
    try:
        for i in range(300):
            sent: list = []
            d = hub.wait(i, {1, 2}, hub.visible_position(), hub.visible_position(), 30, render)
            assert d._attach(lp, sent.append) is None
            if i % 3 == 0:
                d._cancel()  # the client went away
            elif i % 3 == 1:
                assert body(d._expire())["events"] == []  # timed out
            else:
                publish(hub, group=1)  # answered by the fan-out
                lp.run_pending()
                assert len(sent) == 1
            del d, sent
        assert zero_stats(hub)
        assert gc.collect() == 0
    finally:
        gc.enable()
