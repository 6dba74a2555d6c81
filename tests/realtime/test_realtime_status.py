"""StatusWatch: the node-state long-poll."""

from __future__ import annotations

import threading

import pytest
from loop_fixture import FakeLoop, Parked, RealLoop, attach_many, body

from hachat.http.messages import Response, json_response
from hachat.realtime import StatusWatch
from hachat.realtime.status import process_first_version


class StatusRender:
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, state: dict, version: int, changed: bool) -> Response:
        with self._lock:
            self.calls += 1
        return json_response(200, {"state": state, "version": version, "changed": changed})


@pytest.fixture
def loop():
    lp = RealLoop().start()
    yield lp
    lp.stop()
    assert not lp.errors, lp.errors[0]


def test_publish_wakes_every_waiter_with_one_body(loop):
    watch = StatusWatch(loop)
    assert watch.version == 1 and watch.state == {}
    render = StatusRender()
    parked = attach_many(loop, [watch.wait(1 if i % 2 else None, 30, render)
                                for i in range(200)])
    assert watch.stats()["waiters"] == 200
    watch.publish({"role": "active", "epoch": 3})
    responses = [p.response(2) for p in parked]
    assert all(r is responses[0] for r in responses)
    assert render.calls == 1
    assert body(responses[0]) == {"state": {"role": "active", "epoch": 3}, "version": 2,
                                  "changed": True}
    assert watch.stats() == {"waiters": 0, "version": 2}


def test_older_or_foreign_version_is_answered_at_once(loop):
    watch = StatusWatch(loop)
    watch.publish({"role": "passive"})
    watch.publish({"role": "active"})
    assert watch.version == 3
    render = StatusRender()
    old = Parked(loop, watch.wait(1, 30, render))
    assert body(old.response(1)) == {"state": {"role": "active"}, "version": 3, "changed": True}
    # a version from another process (the client followed a failover): also answered
    foreign = Parked(loop, watch.wait(42, 30, render))
    assert body(foreign.response(1))["version"] == 3
    current = Parked(loop, watch.wait(3, 30, render))
    loop.flush()
    assert not current.sent.is_set()
    assert watch.stats()["waiters"] == 1
    current.cancel()
    assert watch.stats()["waiters"] == 0


def test_unchanged_publish_does_not_wake(loop):
    watch = StatusWatch(loop, {"role": "active"})
    render = StatusRender()
    p = Parked(loop, watch.wait(1, 0.1, render))
    state = {"role": "active"}
    watch.publish(state)
    assert watch.version == 1
    loop.flush()
    assert not p.sent.is_set()
    assert body(p.response(2)) == {"state": {"role": "active"}, "version": 1, "changed": False}
    assert watch.stats()["waiters"] == 0
    state["role"] = "fallen"  # the watch keeps its own copy
    assert watch.state == {"role": "active"}


def test_first_poll_without_version_parks_then_times_out(loop):
    watch = StatusWatch(loop, {"role": "passive"})
    p = Parked(loop, watch.wait(None, 0.05, StatusRender()))
    assert body(p.response(2)) == {"state": {"role": "passive"}, "version": 1,
                                   "changed": False}
    assert watch.stats()["waiters"] == 0


def test_cancel_and_many_cycles_leave_no_waiters():
    lp = FakeLoop()
    watch = StatusWatch(lp)
    render = StatusRender()
    for i in range(10_000):
        d = watch.wait(1, 30, render)
        d._attach(lp, lambda r: None)
        if i % 2:
            d._cancel()
        else:
            assert body(d._expire())["changed"] is False
    assert watch.stats()["waiters"] == 0
    assert not watch._waiters


def test_close_all_answers_everyone(loop):
    watch = StatusWatch(loop)
    parked = [Parked(loop, watch.wait(1, 30, StatusRender())) for _ in range(5)]
    bye = json_response(503, {"error": "shutting_down"})
    assert watch.close_all(bye) == 5
    assert all(p.response(1) is bye for p in parked)
    assert watch.stats()["waiters"] == 0
    # the watch keeps working afterwards
    p = Parked(loop, watch.wait(1, 30, StatusRender()))
    watch.publish({"role": "passive"})
    assert body(p.response(1))["version"] == 2


def test_publish_from_many_threads(loop):
    watch = StatusWatch(loop)
    render = StatusRender()
    p = Parked(loop, watch.wait(1, 30, render))
    threads = [threading.Thread(target=watch.publish, args=({"n": i},)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert watch.version == 21
    assert body(p.response(2))["version"] == 2


def test_versions_count_from_the_first_version_given(loop):
    first = process_first_version()
    watch = StatusWatch(loop, {"role": "passive"}, first_version=first)
    assert watch.version == first and 10**15 < first < 2**53
    watch.publish({"role": "active"})
    assert watch.version == first + 1
    # a version counted by another process (a peer, or this node before a restart)
    other = Parked(loop, watch.wait(2, 30, StatusRender()))
    assert body(other.response(1))["changed"] is True
    assert process_first_version() > first  # a later process starts further on


def test_a_render_failure_answers_the_documented_internal_error(loop):
    """Regression: a status render failure answered error "internal", where every other 500
    (and docs/API.md) says "internal_error"."""
    watch = StatusWatch(loop)

    def bad(state, version, changed):
        raise RuntimeError("render bug")

    parked = Parked(loop, watch.wait(1, 30, bad))
    watch.publish({"role": "active"})
    response = parked.response(2)
    assert response.status == 500
    assert body(response)["error"] == "internal_error"
