"""`DeadlineWatch`: one thread that steps an active node down at its local lease deadline."""

from __future__ import annotations

import threading
import time

import pytest

from hachat.cluster import LeaseKeeper, Node, NotActive, Role
from hachat.cluster.watchdog import DeadlineWatch
from hachat.settings import ClusterSettings
from hachat.store import Database
from hachat.store.lease import read_lease


def make_node(**overrides) -> Node:
    values = dict(node_id="n1", public_url="http://n1.test", lease_ttl=1.0,
                  lease_renew_interval=0.2)
    values.update(overrides)
    return Node(ClusterSettings(**values))


def activate(node: Node, epoch: int, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    node.transition(Role.ACTIVE, "test", epoch, lease_deadline=deadline)
    return deadline


@pytest.fixture
def watched():
    node = make_node()
    watch = DeadlineWatch(node)
    watch.start()
    demoted: list[tuple[float, str]] = []
    node.subscribe(lambda old, new, n: demoted.append((time.monotonic(), n.reason))
                   if new is Role.PASSIVE else None)
    yield node, watch, demoted
    watch.stop()


def test_demotes_at_the_deadline_when_nothing_renews(watched):
    node, watch, demoted = watched
    deadline = activate(node, 1, 0.3)
    assert node.wait_for_role(Role.PASSIVE, timeout=2)
    at, reason = demoted[0]
    assert reason == "lease-expired"
    assert deadline <= at < deadline + 0.2, at - deadline
    assert watch.running


def test_a_renewed_deadline_postpones_the_demotion(watched):
    node, _watch, demoted = watched
    activate(node, 1, 0.2)
    for _ in range(5):  # renewals, each moving the deadline on
        time.sleep(0.1)
        assert node.extend_lease(1, time.monotonic() + 0.2)
    assert node.role is Role.ACTIVE and demoted == []
    assert node.wait_for_role(Role.PASSIVE, timeout=2)


def test_watches_each_new_term(watched):
    node, _watch, demoted = watched
    activate(node, 1, 0.1)
    assert node.wait_for_role(Role.PASSIVE, timeout=2)
    activate(node, 2, 0.1)
    assert node.wait_for_role(Role.ACTIVE, timeout=1)
    assert node.wait_for_role(Role.PASSIVE, timeout=2)
    assert [reason for _, reason in demoted] == ["lease-expired", "lease-expired"]
    assert node.epoch == 2


def test_a_stopped_watch_demotes_nothing():
    node = make_node()
    watch = DeadlineWatch(node)
    watch.start()
    activate(node, 1, 0.1)
    watch.stop()
    assert not watch.running
    time.sleep(0.3)
    assert node.role is Role.ACTIVE  # a crashed process: its deadline passed, nobody noticed
    with pytest.raises(NotActive):
        node.write_claim()


def test_the_keeper_starts_no_thread_per_renewal(tmp_path, monkeypatch):
    """Starting a thread waits for the new thread to run: costly when CPU-starved, exactly
    when renewals are late. A lone keeper renews about 8 times here and starts no thread."""
    db = Database(f"sqlite:///{tmp_path / 'h.db'}", pool_size=2)
    db.upgrade()
    node = make_node()
    keeper = LeaseKeeper(node.settings, node, db)
    try:
        assert keeper.start() is Role.ACTIVE
        started: list[str] = []
        original = threading.Thread.start

        def counting_start(self):
            started.append(self.name)
            original(self)

        monkeypatch.setattr(threading.Thread, "start", counting_start)
        epoch = node.epoch
        expires = []
        for _ in range(8):
            time.sleep(0.2)
            expires.append(read_lease(db).expires_at)
        monkeypatch.undo()
        assert node.role is Role.ACTIVE and node.epoch == epoch
        assert len(set(expires)) >= 6  # it did renew all along
        assert started == []
    finally:
        keeper.stop()
        db.dispose()
