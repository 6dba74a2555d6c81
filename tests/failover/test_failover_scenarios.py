"""Failover with real processes and real signals, a writer running throughout. After each
scenario: every acknowledged message stored exactly once, epochs never go backwards, and never
two active nodes at once."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from harness import Pair, Writer, check_no_loss_no_dup_no_split, stored_messages

from support import ChatUser, call


class ActiveWatch:
    """Polls both nodes' /health and records any moment with two active nodes."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.double: list = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            health = self.pair.health()
            if sum(1 for h in health if h and h["active"]) > 1:
                self.double.append(health)
            time.sleep(0.05)

    def stop(self) -> list:
        self._stop.set()
        self._t.join(5)
        return self.double


def _finish(pair, user, gid, writer, watch):
    acks = writer.stop()
    assert watch.stop() == []
    active = pair.wait_one_active()
    assert len(acks) > 10
    check_no_loss_no_dup_no_split(acks, stored_messages(active.url, user.token, gid))
    return acks


def test_kill_9_of_the_active(pair, chat):
    user, gid = chat
    writer = Writer([pair.a.url, pair.b.url], user.token, gid).start()
    watch = ActiveWatch(pair)
    time.sleep(1.0)
    pair.a.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    new = pair.wait_one_active(exclude=pair.a, timeout=10)
    assert new is pair.b
    assert time.monotonic() - killed_at < 4.0
    time.sleep(1.0)
    acks = _finish(pair, user, gid, writer, watch)
    assert {a.node for a in acks} == {pair.a.url, pair.b.url}
    assert len({a.epoch for a in acks}) == 2


# PostgreSQL only: on a shared SQLite file, a process stopped inside a write transaction keeps
# the file's write lock, and no other process can write until it resumes (docs/FAILOVER.md).
@pytest.mark.parametrize("fresh_db", ["postgres"], indirect=True)
def test_paused_leader_comes_back_passive_and_writes_nothing(pair, chat):
    user, gid = chat
    writer = Writer([pair.a.url, pair.b.url], user.token, gid).start()
    watch = ActiveWatch(pair)
    time.sleep(0.5)
    pair.a.signal(signal.SIGSTOP)
    try:
        pair.wait_one_active(exclude=pair.a, timeout=10)
        time.sleep(1.0)
    finally:
        pair.a.signal(signal.SIGCONT)
    resumed = time.monotonic()
    time.sleep(1.5)
    health_a = call(pair.a.url, "GET", "/health").json
    assert health_a["active"] is False and health_a["status"] == "alive"
    acks = _finish(pair, user, gid, writer, watch)
    old_epoch = min(a.epoch for a in acks)
    assert not [a for a in acks if a.node == pair.a.url and a.at > resumed]
    assert all(a.epoch > old_epoch for a in acks if a.at > resumed)
    # and a direct write to the woken node is refused, pointing at the active one
    reply = call(pair.a.url, "POST", "/messages", {"groupId": gid, "content": "stale"},
                 token=user.token)
    assert reply.status == 503 and reply.json["error"] == "not_active"
    assert reply.json["active"] == pair.b.url


def test_fall_then_revive(pair, chat):
    user, gid = chat
    writer = Writer([pair.a.url, pair.b.url], user.token, gid).start()
    watch = ActiveWatch(pair)
    time.sleep(0.5)
    fell_at = time.monotonic()
    fell = pair.admin(pair.a, "/fall")
    assert fell.status == 200 and fell.json["status"] == "down" and fell.json["active"] is False
    assert pair.wait_one_active(exclude=pair.a, timeout=5) is pair.b
    assert time.monotonic() - fell_at < 1.5  # the lease was given up: no expiry to wait for
    down = call(pair.a.url, "GET", "/messages", {"groupId": gid}, token=user.token)
    assert down.status == 503 and down.json["error"] == "not_active"
    assert pair.admin(pair.a, "/revive").json["status"] == "alive"
    time.sleep(1.5)
    assert [h["active"] for h in pair.health()] == [False, True]  # no preemption
    _finish(pair, user, gid, writer, watch)


def test_restart_of_either_node(pair, chat):
    user, gid = chat
    writer = Writer([pair.a.url, pair.b.url], user.token, gid).start()
    watch = ActiveWatch(pair)
    time.sleep(0.5)
    assert pair.b.stop() == 0  # the passive: nothing changes
    pair.b.start()
    time.sleep(0.5)
    assert pair.active_nodes() == [pair.a]
    assert pair.a.stop() == 0  # the active, gracefully: hands over the lease at once
    assert pair.wait_one_active(timeout=5) is pair.b
    pair.a.start()  # IS_ACTIVE=true, but the lease is held: it must come back passive
    time.sleep(1.0)
    assert pair.active_nodes() == [pair.b]
    _finish(pair, user, gid, writer, watch)


def test_nodes_cut_off_from_each_other_but_not_the_database(fresh_db, tmp_path):
    pair = Pair(fresh_db, tmp_path, relay_peers=True).start()
    try:
        user = ChatUser(pair.a.url, "writer")
        gid = user("POST", "/groups", {"name": "ha"}).json["id"]
        writer = Writer([pair.a.url, pair.b.url], user.token, gid).start()
        watch = ActiveWatch(pair)
        time.sleep(0.5)
        for relay in pair.relays:
            relay.cut()
        time.sleep(4.0)  # both see the peer as unreachable; the lease keeps A active
        assert pair.active_nodes() == [pair.a]
        for relay in pair.relays:
            relay.heal()
        time.sleep(0.5)
        acks = _finish(pair, user, gid, writer, watch)
        assert len({a.epoch for a in acks}) == 1  # no failover happened at all
    finally:
        pair.stop()


def test_client_resumes_events_on_the_new_active(pair):
    ana = ChatUser(pair.a.url, "ana")
    bea = ChatUser(pair.a.url, "bea")
    gid = ana("POST", "/groups", {"name": "ev", "memberIds": [bea.id]}).json["id"]
    cursor = bea("GET", "/events").json["cursor"]
    for i in range(3):
        ana("POST", "/messages", {"groupId": gid, "content": f"before {i}"})
    pair.a.signal(signal.SIGKILL)
    new = pair.wait_one_active(exclude=pair.a)
    for i in range(3):
        reply = call(new.url, "POST", "/messages", {"groupId": gid, "content": f"after {i}"},
                     token=ana.token)
        assert reply.status == 201
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(seen) < 6:
        reply = call(new.url, "GET", f"/events?since={cursor}&timeout=1", token=bea.token)
        assert reply.status == 200, reply.raw
        seen.extend(e for e in reply.json["events"] if e["type"] == "message.created")
        cursor = reply.json["cursor"]
    assert [e["data"]["content"] for e in seen] == [f"before {i}" for i in range(3)] + \
        [f"after {i}" for i in range(3)]


def test_quick_fall_and_revive_hands_over_to_the_peer(pair, chat):
    """Regression: a node revived right after /fall took its own lease back before the live
    peer could. The peer must take over; the revived node stays passive."""
    for _ in range(3):
        active = pair.wait_one_active()
        other = pair.b if active is pair.a else pair.a
        assert pair.admin(active, "/fall").status == 200
        assert pair.admin(active, "/revive").status == 200  # at once, before the peer reacts
        assert pair.wait_one_active(timeout=10) is other
        time.sleep(0.5)
        assert pair.active_nodes() == [other]


def _time_without_active(pair, timeout: float = 10.0) -> float:
    """From now until one node says it is active, in seconds."""
    started = time.monotonic()
    pair.wait_one_active(timeout=timeout)
    return time.monotonic() - started


# A free lease is taken within one health check plus one renew tick (FAST: 0.2 s + 0.25 s),
# even by a node just revived, when its peer is not going to take it; well under the several
# seconds of the revive hold-off. The margin covers process scheduling on a busy machine.
NO_ACTIVE_BOUND = 0.2 + 0.25 + 0.6


def test_both_fall_then_both_revive_an_active_node_is_back_at_once(pair):
    assert pair.admin(pair.a, "/fall").status == 200
    pair.wait_one_active(exclude=pair.a, timeout=5)
    assert pair.admin(pair.b, "/fall").status == 200
    time.sleep(0.6)  # both down, the lease free
    assert pair.active_nodes() == []
    assert pair.admin(pair.a, "/revive").status == 200
    assert pair.admin(pair.b, "/revive").status == 200
    took = _time_without_active(pair)
    print(f"no active node for {took:.2f}s after both revived")
    assert took < NO_ACTIVE_BOUND, took
    time.sleep(0.5)
    assert len(pair.active_nodes()) == 1


def test_the_active_falls_while_the_other_is_just_revived(pair):
    assert pair.admin(pair.b, "/fall").status == 200
    assert pair.admin(pair.b, "/revive").status == 200  # B now holds off for a while
    time.sleep(0.6)
    assert pair.active_nodes() == [pair.a]
    assert pair.admin(pair.a, "/fall").status == 200
    took = _time_without_active(pair)
    print(f"no active node for {took:.2f}s after the active fell")
    assert took < NO_ACTIVE_BOUND, took
    assert pair.active_nodes() == [pair.b]
