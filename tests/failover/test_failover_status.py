"""What a pair says about itself while roles move: GET /health and the GET /subscribe/status
long-poll on both nodes, the way a client following the pair reads them (its last version in
hand, sometimes asking the other node)."""

from __future__ import annotations

import time

from support import call


def _status(url: str, since: int | None = None, timeout: float = 0.0) -> tuple[dict, float]:
    """(the /subscribe/status body, seconds it took to answer)."""
    query = f"/subscribe/status?timeout={timeout}" + (f"&since={since}" if since else "")
    started = time.monotonic()
    reply = call(url, "GET", query, timeout=timeout + 10)
    assert reply.status == 200, reply.raw
    return reply.json, time.monotonic() - started


def _health(url: str) -> dict:
    reply = call(url, "GET", "/health")
    assert reply.status == 200, reply.raw
    return reply.json


def test_a_fallen_node_tells_who_took_over_in_health_and_status(pair):
    """Regression: a node's /health and /subscribe/status changed only with its own role, so
    the node that fell kept saying `leader: null` and the old epoch after its peer took over,
    and a status long-poll parked on it was not answered when the leader changed."""
    assert pair.admin(pair.a, "/fall").status == 200
    seen, _ = _status(pair.a.url)
    assert seen["role"] == "fallen"
    assert pair.wait_one_active(exclude=pair.a, timeout=5) is pair.b
    b = _health(pair.b.url)
    state = seen
    deadline = time.monotonic() + 5.0
    while (state["leader"], state["epoch"]) != (pair.b.url, b["epoch"]) \
            and time.monotonic() < deadline:
        # The change must answer a parked poll at once (within a lease tick or two).
        state, took = _status(pair.a.url, since=state["version"], timeout=10)
        assert took < 3.0, (took, state)
        assert state["changed"] is True, state
    assert state["leader"] == pair.b.url and state["epoch"] == b["epoch"], state
    health = _health(pair.a.url)
    assert health["leader"] == pair.b.url and health["epoch"] == b["epoch"], health
    assert health["role"] == "fallen" and health["active"] is False

    # Revived, then the other node falls: the passive one takes over (its own change) and
    # the node that fell second learns the new leader the same way.
    assert pair.admin(pair.a, "/revive").status == 200
    time.sleep(2.0)  # past the revive hold-off: the lease stays with B
    assert pair.admin(pair.b, "/fall").status == 200
    assert pair.wait_one_active(exclude=pair.b, timeout=5) is pair.a
    epoch = _health(pair.a.url)["epoch"]
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        health = _health(pair.b.url)
        if (health["leader"], health["epoch"]) == (pair.a.url, epoch):
            break
        time.sleep(0.05)
    health = _health(pair.b.url)
    assert health["leader"] == pair.a.url and health["epoch"] == epoch, health


def test_a_status_version_from_the_other_node_is_answered_at_once(pair):
    """Regression: both nodes counted status versions from 1, so a client that followed a
    failover to the other node with the version it last saw could name that node's current
    version by chance and wait its whole timeout although the state it saw was not this
    node's (active there, passive here)."""
    time.sleep(1.0)  # both settled: one active, one passive
    a, _ = _status(pair.a.url)
    b, _ = _status(pair.b.url)
    assert a["active"] is True and b["active"] is False
    for url, other in ((pair.b.url, a), (pair.a.url, b)):
        state, took = _status(url, since=other["version"], timeout=5)
        assert took < 1.0 and state["changed"] is True, (took, state)
        assert state["version"] != other["version"]


def test_a_status_version_from_before_a_restart_is_answered_at_once(pair):
    """A restarted node is a new process: a version from the old one is not its current
    version, so a client holding it is answered at once with the state as it is now."""
    time.sleep(1.0)
    before, _ = _status(pair.b.url)
    assert pair.b.stop() == 0
    pair.b.start()
    time.sleep(1.0)
    state, took = _status(pair.b.url, since=before["version"], timeout=5)
    assert took < 1.0 and state["changed"] is True, (took, state)
