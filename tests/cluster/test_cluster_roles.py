"""The role state machine and `Node`: transitions, the log line, listeners, write admission."""

from __future__ import annotations

import itertools
import logging
import threading
import time

import pytest

from hachat.cluster import TRANSITIONS, InvalidTransition, Node, NotActive, Role, allowed
from hachat.settings import ClusterSettings

ALLOWED = {
    (Role.STARTING, Role.PASSIVE),
    (Role.STARTING, Role.ACTIVE),
    (Role.STARTING, Role.FALLEN),
    (Role.PASSIVE, Role.ACTIVE),
    (Role.PASSIVE, Role.FALLEN),
    (Role.ACTIVE, Role.PASSIVE),
    (Role.ACTIVE, Role.FALLEN),
    (Role.FALLEN, Role.PASSIVE),
}
PAIRS = list(itertools.product(Role, Role))
FORBIDDEN = [(a, b) for a, b in PAIRS if a is not b and (a, b) not in ALLOWED]


def make_node(**overrides) -> Node:
    values = dict(node_id="n1", public_url="http://n1.test", peer_url="http://n2.test",
                  lease_ttl=1.0, lease_renew_interval=0.2, health_interval=0.2)
    values.update(overrides)
    return Node(ClusterSettings(**values))


def node_in(role: Role, epoch: int = 7) -> Node:
    """A fresh node driven to `role` along allowed transitions."""
    node = make_node()
    path = {
        Role.STARTING: [],
        Role.PASSIVE: [Role.PASSIVE],
        Role.ACTIVE: [Role.ACTIVE],
        Role.FALLEN: [Role.FALLEN],
    }[role]
    for step in path:
        node.transition(step, "setup", epoch if step is Role.ACTIVE else None,
                        lease_deadline=time.monotonic() + 60)
    assert node.role is role
    return node


def test_role_values_are_lower_case_names():
    assert [r.value for r in Role] == ["starting", "passive", "active", "fallen"]


def test_transition_table_is_exactly_the_design():
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == ALLOWED
    assert set(TRANSITIONS) == set(Role)
    assert all(isinstance(v, frozenset) for v in TRANSITIONS.values())
    for a, b in PAIRS:
        assert allowed(a, b) is ((a, b) in ALLOWED)


@pytest.mark.parametrize(("old", "new"), sorted(ALLOWED, key=str), ids=lambda r: r.value)
def test_every_allowed_transition(old, new):
    node = node_in(old)
    seen = []
    node.subscribe(lambda o, n, nd: seen.append((o, n, nd)))
    assert node.transition(new, "test", 9 if new is Role.ACTIVE else None) is True
    assert node.role is new
    assert seen == [(old, new, node)]
    assert node.alive is (new is not Role.FALLEN)
    # active means: the role, and a lease deadline still ahead (none was given here)
    assert node.is_active is (new is Role.ACTIVE and node.lease_deadline > time.monotonic())


@pytest.mark.parametrize(("old", "new"), FORBIDDEN, ids=lambda r: r.value)
def test_every_forbidden_transition(old, new):
    node = node_in(old)
    seen = []
    node.subscribe(lambda *a: seen.append(a))
    with pytest.raises(InvalidTransition) as info:
        node.transition(new, "test", 9)
    assert (info.value.old, info.value.new) == (old, new)
    assert node.role is old
    assert seen == []


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
def test_same_role_is_a_no_op(role, caplog):
    node = node_in(role)
    seen = []
    node.subscribe(lambda *a: seen.append(a))
    caplog.set_level(logging.INFO, logger="hachat.cluster")
    caplog.clear()
    assert node.transition(role, "again", 11 if role is Role.ACTIVE else None) is False
    assert seen == [] and caplog.records == []
    assert node.epoch == (7 if role is Role.ACTIVE else 0)


def test_one_log_line_per_transition(caplog):
    caplog.set_level(logging.DEBUG, logger="hachat.cluster")
    node = make_node()
    node.transition(Role.PASSIVE, "start")
    node.transition(Role.ACTIVE, "peer-unreachable", 7, lease_deadline=time.monotonic() + 5)
    node.transition(Role.FALLEN, "fall")
    lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("hachat.cluster", logging.INFO, "role starting -> passive epoch=0 reason=start"),
        ("hachat.cluster", logging.INFO, "role passive -> active epoch=7 reason=peer-unreachable"),
        ("hachat.cluster", logging.INFO, "role active -> fallen epoch=7 reason=fall"),
    ]


def test_active_needs_an_epoch():
    node = make_node()
    with pytest.raises(ValueError):
        node.transition(Role.ACTIVE, "start")
    assert node.role is Role.STARTING


def test_guards_only_from_and_only_epoch():
    node = node_in(Role.ACTIVE, epoch=7)
    assert node.transition(Role.FALLEN, "x", only_from=Role.PASSIVE) is False
    assert node.demote("fenced", epoch=6) is False
    assert node.role is Role.ACTIVE
    assert node.demote("fenced", epoch=7) is True
    assert node.role is Role.PASSIVE and node.reason == "fenced"
    assert node.demote("again") is False  # not active: nothing to do


def test_listeners_run_outside_the_lock_and_failures_are_contained(caplog):
    node = make_node()
    calls = []

    def reads_node(old, new, nd):  # would deadlock if called under the node lock
        calls.append((old, new, nd.role, nd.snapshot()["role"]))

    def broken(old, new, nd):
        raise RuntimeError("listener bug")

    node.subscribe(broken)
    unsubscribe = node.subscribe(reads_node)
    caplog.set_level(logging.INFO, logger="hachat.cluster")
    assert node.transition(Role.PASSIVE, "start") is True
    assert calls == [(Role.STARTING, Role.PASSIVE, Role.PASSIVE, "passive")]
    assert any("listener" in r.getMessage() and r.exc_info for r in caplog.records)
    unsubscribe()
    node.transition(Role.FALLEN, "fall")
    assert len(calls) == 1


def test_listeners_see_transitions_in_order_under_concurrency():
    node = node_in(Role.PASSIVE)
    seen = []
    node.subscribe(lambda o, n, nd: (time.sleep(0.001), seen.append((o, n))))
    stop = time.monotonic() + 0.5

    def flip(target, source):
        while time.monotonic() < stop:
            node.transition(target, "flip", 3 if target is Role.ACTIVE else None,
                            only_from=source, lease_deadline=time.monotonic() + 5)

    threads = [threading.Thread(target=flip, args=(Role.ACTIVE, Role.PASSIVE)),
               threading.Thread(target=flip, args=(Role.PASSIVE, Role.ACTIVE))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) > 2
    for (_o1, n1), (o2, _n2) in itertools.pairwise(seen):
        assert n1 is o2  # each notification continues where the previous one ended


def test_write_claim_needs_active_and_an_unexpired_local_deadline():
    node = make_node()
    with pytest.raises(NotActive) as info:
        node.write_claim()
    assert info.value.leader_url is None
    node.transition(Role.ACTIVE, "start", 4, lease_deadline=time.monotonic() + 0.15)
    assert node.write_claim() == ("n1", 4)
    assert node.leader_url == "http://n1.test"
    time.sleep(0.2)  # the deadline passed while still ACTIVE (keeper paused): no writes
    assert node.role is Role.ACTIVE
    with pytest.raises(NotActive):
        node.write_claim()
    assert node.snapshot()["active"] is False
    assert node.extend_lease(4, time.monotonic() + 5) is True
    assert node.extend_lease(3, time.monotonic() + 50) is False
    assert node.write_claim() == ("n1", 4)
    node.demote("fenced")
    assert node.lease_deadline < time.monotonic()
    with pytest.raises(NotActive):
        node.write_claim()


def test_leader_url_from_lease_then_peer():
    node = node_in(Role.PASSIVE)
    assert node.leader_url is None
    node.observe_peer({"status": "alive", "active": True})
    assert node.leader_url == "http://n2.test"
    node.observe_lease("n3", "http://n3.test", 12)
    assert node.leader_url == "http://n3.test"
    assert node.epoch == 12  # the last epoch known
    with pytest.raises(NotActive) as info:
        node.write_claim()
    assert info.value.leader_url == "http://n3.test"
    node.observe_lease("n1", "http://n1.test", 12)  # our own stale lease is not a leader
    assert node.leader_url == "http://n2.test"
    node.observe_lease(None, None, 12)
    node.observe_peer(None)
    assert node.leader_url is None


def test_watchers_hear_of_a_new_leader_or_epoch_only():
    node = node_in(Role.FALLEN)
    seen: list[tuple[str | None, int]] = []
    unwatch = node.watch(lambda n: seen.append((n.leader_url, n.epoch)))
    node.observe_lease("n2", "http://n2.test", 4)
    node.observe_lease("n2", "http://n2.test", 4)  # nothing new: nobody is told
    node.observe_peer({"status": "alive", "active": True})  # same leader
    node.observe_lease(None, None, 4)  # free: the peer's /health still says it leads
    node.observe_peer(None)
    node.observe_lease("n2", "http://n2.test", 5)
    assert seen == [("http://n2.test", 4), (None, 4), ("http://n2.test", 5)]
    unwatch()
    node.observe_lease("n3", "http://n3.test", 6)
    assert len(seen) == 3


def test_snapshot_shape():
    node = make_node()
    assert node.snapshot() == {"status": "alive", "active": False, "node": "n1", "epoch": 0,
                               "peer": "http://n2.test", "role": "starting", "leader": None}
    node.transition(Role.ACTIVE, "start", 5, lease_deadline=time.monotonic() + 5)
    assert node.snapshot() == {"status": "alive", "active": True, "node": "n1", "epoch": 5,
                               "peer": "http://n2.test", "role": "active",
                               "leader": "http://n1.test"}
    node.transition(Role.FALLEN, "fall")
    snap = node.snapshot()
    assert (snap["status"], snap["active"], snap["role"], snap["epoch"]) == (
        "down", False, "fallen", 5)
    lone = make_node(peer_url=None)
    assert lone.snapshot()["peer"] is None


def test_wait_for_role():
    node = make_node()
    threading.Timer(0.05, node.transition, (Role.PASSIVE, "start")).start()
    assert node.wait_for_role(Role.PASSIVE, timeout=2) is True
    assert node.wait_for_role(Role.ACTIVE, timeout=0.05) is False
