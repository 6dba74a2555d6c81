"""Two nodes (Node + PeerMonitor + LeaseKeeper) in one process on one real database.

Each node's /health is served by a tiny real HTTP server, so the peer monitors talk real HTTP;
the database is a real SQLite file or a real PostgreSQL database (required when CI=true).
The only test double is `GatedDB`, a wrapper around the database connections (the request pool
and the keeper's control lane) that can make every call fail (database cut off) or block
(process paused) for one node.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import text

from hachat.cluster import LeaseKeeper, Node, NotActive, PeerMonitor, Role
from hachat.settings import ClusterSettings
from hachat.store import Database, Fenced, StoreUnavailable
from hachat.store.lease import assert_holder, read_lease, try_acquire

TTL = 1.0
RENEW = 0.2
HEALTH = 0.2
FAST = dict(lease_ttl=TTL, lease_renew_interval=RENEW, health_interval=HEALTH,
            health_timeout=0.15, health_failures=3)


# -- databases ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database_url(request, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('cluster') / 'lease.db'}"
    else:
        import dbutil  # the store's test helpers, in tests/

        dbutil.require_pg_or_skip()  # fails instead when CI=true
        url = dbutil.create_pg_database()
        request.addfinalizer(lambda: dbutil.drop_pg_database(url))
    db = Database(url, pool_size=2)
    db.upgrade()
    db.dispose()
    return url


@pytest.fixture
def cluster(database_url):
    """Builds members on a database whose lease is free; shuts every member down after."""
    admin = Database(database_url, pool_size=2)
    with admin.write() as s:
        s.execute(text("UPDATE lease SET holder = NULL, holder_url = NULL, expires_at = 0"))
    made: list[Member] = []

    def make(name, *, is_active, peer=None, health=None, **kw) -> Member:
        member = Member.build(name, database_url, is_active=is_active, peer=peer,
                              health=health, **kw)
        made.append(member)
        return member

    make.admin = admin
    yield make
    for member in made:
        member.shutdown()
    admin.dispose()


class GatedDB:
    """The node's database connections, which the test can cut off or freeze."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.dialect = db.dialect
        self.fail = False
        self.running = threading.Event()
        self.running.set()
        self.control = GatedLane(self, db.control)

    def _gate(self) -> None:
        self.running.wait()
        if self.fail:
            raise StoreUnavailable("test: database cut off")

    def read(self):
        self._gate()
        return self.db.read()

    def write(self):
        self._gate()
        return self.db.write()


class GatedLane:
    """The keeper's control lane behind the same gate (what the lease functions use)."""

    def __init__(self, gated: GatedDB, lane) -> None:
        self.gated = gated
        self.lane = lane
        self.dialect = lane.dialect

    def run(self, sql, params, *, write):
        self.gated._gate()
        return self.lane.run(sql, params, write=write)

    def transaction(self):
        self.gated._gate()
        return self.lane.transaction()


class HealthServer:
    """Serves `node.snapshot()` at /health; blocks while the node is "paused"."""

    def __init__(self, report: dict | None = None) -> None:
        self.node: Node | None = None
        self.report = report  # a fixed answer instead of the node's snapshot
        self.running = threading.Event()
        self.running.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.running.wait(5)
                report = outer.report or outer.node.snapshot()
                body = json.dumps(report).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the monitor gave up waiting (we were "paused")
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.started = False
        self.closed = False

    def start(self) -> None:
        self.started = True
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.running.set()
            # shutdown() waits for serve_forever() to end: forever if it never began (a
            # test that failed before starting this member).
            if self.started:
                self.server.shutdown()
            self.server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Member:
    name: str
    settings: ClusterSettings
    node: Node
    db: GatedDB
    monitor: PeerMonitor
    keeper: LeaseKeeper
    health: HealthServer
    changes: list = field(default_factory=list)  # (monotonic, old, new, reason, epoch)
    prepared: list = field(default_factory=list)

    @classmethod
    def build(cls, name, url, *, is_active, peer, health, prepare=None, **kw) -> Member:
        health = health or HealthServer()
        settings = ClusterSettings(node_id=name, public_url=health.url, is_active=is_active,
                                   peer_url=peer, **{**FAST, **kw})
        node = Node(settings)
        health.node = node
        db = GatedDB(Database(url, pool_size=4, lock_timeout=2.0))
        monitor = PeerMonitor(settings, node)
        member = cls(name, settings, node, db, monitor, None, health)  # type: ignore[arg-type]

        def prepare_activation(epoch):
            member.prepared.append(epoch)
            if prepare is not None:
                prepare(epoch)

        member.keeper = LeaseKeeper(settings, node, db, monitor, prepare_activation)
        node.subscribe(lambda old, new, n: member.changes.append(
            (time.monotonic(), old, new, n.reason, n.epoch)))
        return member

    def start(self) -> Role:
        self.health.start()
        self.monitor.start()
        return self.keeper.start()

    def crash(self) -> None:
        """The process dies: nothing is released, nothing answers any more."""
        self.keeper.stop(release=False)
        self.monitor.stop()
        self.health.close()

    def shutdown(self) -> None:
        self.db.running.set()
        self.keeper.stop(release=True)
        self.monitor.stop()
        self.health.close()
        self.db.db.dispose()

    def wait_role(self, role: Role, timeout: float) -> float:
        """Seconds it took to reach `role`; fails the test on timeout."""
        started = time.monotonic()
        assert self.node.wait_for_role(role, timeout=timeout), (
            f"{self.name} is {self.node.role.value}, not {role.value}, after {timeout}s; "
            f"changes: {self.reasons()}")
        return time.monotonic() - started

    def reasons(self) -> list[tuple[str, str, str]]:
        return [(old.value, new.value, reason) for _, old, new, reason, _ in self.changes]


def pair(cluster, **kw) -> tuple[Member, Member]:
    """A (IS_ACTIVE=true) and B (IS_ACTIVE=false), each the other's peer, both started."""
    ha, hb = HealthServer(), HealthServer()
    a = cluster("A", is_active=True, peer=hb.url, health=ha, **kw)
    b = cluster("B", is_active=False, peer=ha.url, health=hb, **kw)
    assert a.start() is Role.ACTIVE
    assert b.start() is Role.PASSIVE
    return a, b


def stays(member: Member, role: Role, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert member.node.role is role, member.reasons()
        time.sleep(0.02)


# -- scenarios --------------------------------------------------------------------------------
def test_exactly_one_active_and_the_passive_knows_the_leader(cluster):
    a, b = pair(cluster)
    assert a.reasons() == [("starting", "active", "start")]
    assert b.reasons() == [("starting", "passive", "start")]
    epoch = a.node.epoch
    assert a.prepared == [epoch] and b.prepared == []
    assert a.node.write_claim() == ("A", epoch)
    stays(b, Role.PASSIVE, 0.6)
    assert a.node.role is Role.ACTIVE and a.node.epoch == epoch
    assert b.node.leader_url == a.health.url and b.node.epoch == epoch
    with pytest.raises(NotActive) as info:
        b.node.write_claim()
    assert info.value.leader_url == a.health.url
    assert b.monitor.peer_down is False and a.monitor.peer_down is True  # B is passive
    lease = read_lease(cluster.admin)
    assert (lease.holder, lease.holder_url, lease.epoch) == ("A", a.health.url, epoch)


def test_both_starting_active_at_once_gives_exactly_one(cluster):
    ha, hb = HealthServer(), HealthServer()
    a = cluster("A", is_active=True, peer=hb.url, health=ha)
    b = cluster("B", is_active=True, peer=ha.url, health=hb)
    roles = {}
    threads = [threading.Thread(target=lambda m=m: roles.__setitem__(m.name, m.start()))
               for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.value for r in roles.values()) == ["active", "passive"]
    loser = b if roles["A"] is Role.ACTIVE else a
    assert loser.reasons()[0][2] in ("lease-held-by-A", "lease-held-by-B")
    stays(loser, Role.PASSIVE, 0.5)


def test_restart_with_is_active_while_the_other_holds_the_lease_is_passive(cluster):
    a, b = pair(cluster)
    b.crash()
    hb = HealthServer()
    b2 = cluster("B", is_active=True, peer=a.health.url, health=hb)
    assert b2.start() is Role.PASSIVE
    assert b2.reasons() == [("starting", "passive", "lease-held-by-A")]
    stays(b2, Role.PASSIVE, 0.6)
    assert a.node.role is Role.ACTIVE


def test_crash_of_the_active_fails_over_within_ttl_plus_detection(cluster):
    a, b = pair(cluster)
    epoch = a.node.epoch
    a.crash()
    took = b.wait_role(Role.ACTIVE, timeout=5)
    print(f"crash takeover {took:.2f}s")
    assert took < TTL + 2 * HEALTH + 0.4, took
    assert b.node.epoch == epoch + 1 and b.prepared == [epoch + 1]
    assert b.reasons()[-1][2] in ("peer-unreachable", "lease-free")
    # The crashed node's state still says ACTIVE, but its local deadline has passed.
    assert a.node.role is Role.ACTIVE
    with pytest.raises(NotActive):
        a.node.write_claim()


def test_fall_hands_over_at_once_and_revive_does_not_preempt(cluster):
    a, b = pair(cluster)
    epoch = a.node.epoch
    started = time.monotonic()
    assert a.keeper.fall() is True
    assert a.node.role is Role.FALLEN
    assert a.node.snapshot()["status"] == "down"
    took = b.wait_role(Role.ACTIVE, timeout=2)
    print(f"fall takeover {took:.2f}s")
    assert time.monotonic() - started < 1.0
    assert b.node.epoch == epoch + 1
    assert b.reasons()[-1][2] in ("lease-free", "peer-down")
    assert a.keeper.fall() is False  # already fallen
    stays(a, Role.FALLEN, 0.3)  # a fallen node neither renews nor acquires
    assert a.node.leader_url == b.health.url
    assert a.keeper.revive() is True
    assert a.node.role is Role.PASSIVE
    stays(a, Role.PASSIVE, 0.8)
    assert b.node.role is Role.ACTIVE and b.node.epoch == epoch + 1
    assert a.reasons() == [("starting", "active", "start"), ("active", "fallen", "fall"),
                           ("fallen", "passive", "revive")]


# After /revive a node leaves the lease it gave up to a live peer for a moment (no
# preemption), but a free lease must never sit untaken for a long hold-off: a lease someone
# else gave up, or any lease when the peer is down, is taken within one health check and one
# renew tick; the node's own lease only after a short grace if the live peer does not take it.
GAP_BOUND = HEALTH + RENEW + 0.35


def first_active(*members: Member, timeout: float) -> tuple[Member, float]:
    """The first of `members` to turn ACTIVE, and how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        for member in members:
            if member.node.role is Role.ACTIVE:
                return member, time.monotonic() - started
        time.sleep(0.005)
    raise AssertionError(f"nobody active after {timeout}s: "
                         f"{[(m.name, m.reasons()) for m in members]}")


def test_both_fallen_then_revived_take_the_free_lease_at_once(cluster):
    a, b = pair(cluster)
    a.keeper.fall()
    b.wait_role(Role.ACTIVE, timeout=2)
    b.keeper.fall()
    time.sleep(3 * HEALTH)  # both fallen: the lease is free, each monitor sees the other down
    assert read_lease(cluster.admin).holder is None
    a.keeper.revive()
    b.keeper.revive()
    winner, took = first_active(a, b, timeout=5)
    print(f"no active node for {took:.2f}s after both revived")
    assert took < GAP_BOUND, (took, a.reasons(), b.reasons())
    loser = b if winner is a else a
    stays(loser, Role.PASSIVE, 0.5)
    assert winner.node.role is Role.ACTIVE


def test_the_active_falls_while_the_passive_is_in_its_revive_hold_off(cluster):
    a, b = pair(cluster)
    b.keeper.fall()
    b.keeper.revive()  # B holds off for several seconds from here
    time.sleep(3 * HEALTH)  # A's monitor saw B fall and come back; A keeps the lease
    assert a.node.role is Role.ACTIVE and b.node.role is Role.PASSIVE
    a.keeper.fall()
    took = b.wait_role(Role.ACTIVE, timeout=5)
    print(f"no active node for {took:.2f}s after the active fell")
    assert took < GAP_BOUND, (took, b.reasons())


def test_quick_fall_and_revive_of_both_leaves_the_lease_to_nobody_for_long(cluster):
    """The active falls and revives at once while the passive has itself just fallen and
    revived: B gave no lease up, so it takes A's released one within one health check and one
    renew tick, and A yields it to B."""
    a, b = pair(cluster)
    b.keeper.fall()
    b.keeper.revive()
    time.sleep(3 * HEALTH)
    started = time.monotonic()
    a.keeper.fall()
    a.keeper.revive()
    _, took = first_active(a, b, timeout=5)
    print(f"no active node for {took:.2f}s")
    assert took < GAP_BOUND, (took, a.reasons(), b.reasons())
    assert time.monotonic() - started < 5


def test_a_revived_node_yields_its_lease_only_as_long_as_a_live_peer_needs(cluster):
    """The peer answers /health but cannot take the lease (its database is cut off): the node
    that fell and revived at once takes its lease back after the peer's grace, not later."""
    a, b = pair(cluster)
    b.db.fail = True
    started = time.monotonic()
    a.keeper.fall()
    a.keeper.revive()
    took = a.wait_role(Role.ACTIVE, timeout=5)
    print(f"retook its own lease after {took:.2f}s")
    assert a.keeper.peer_grace - 0.05 < time.monotonic() - started \
        < a.keeper.peer_grace + RENEW + 0.35, a.reasons()
    b.db.fail = False
    stays(b, Role.PASSIVE, 0.5)


def test_graceful_stop_hands_over_at_once(cluster):
    a, b = pair(cluster)
    started = time.monotonic()
    a.shutdown()
    b.wait_role(Role.ACTIVE, timeout=2)
    took = time.monotonic() - started
    print(f"graceful-stop takeover {took:.2f}s")
    assert took < 0.6, took
    assert a.reasons()[-1] == ("active", "passive", "shutdown")


def test_lone_node_is_active_again_after_fall_and_revive(cluster):
    solo = cluster("S", is_active=True)
    assert solo.start() is Role.ACTIVE
    first = solo.node.epoch
    solo.keeper.fall()
    assert read_lease(cluster.admin).holder is None  # released
    stays(solo, Role.FALLEN, 0.3)
    solo.keeper.revive()
    took = solo.wait_role(Role.ACTIVE, timeout=2)
    assert took < 0.5, took
    assert solo.node.epoch == first + 1
    assert solo.reasons()[-2:] == [("fallen", "passive", "revive"),
                                   ("passive", "active", "no-peer")]


def test_a_stuck_peer_that_still_says_active_is_replaced_once_its_lease_is_long_expired(cluster):
    """The peer answers /health "alive, active" but stopped renewing: after the lease has been
    expired for one more TTL (by the database clock) the passive takes it anyway."""
    stuck = HealthServer(report={"status": "alive", "active": True, "role": "active"})
    stuck.start()
    assert try_acquire(cluster.admin, "ghost", stuck.url, 0.2) is not None
    b = cluster("B", is_active=False, peer=stuck.url)
    assert b.start() is Role.PASSIVE
    took = b.wait_role(Role.ACTIVE, timeout=4)
    stuck.close()
    assert b.reasons()[-1] == ("passive", "active", "lease-free")
    assert b.monitor.peer_down is False
    assert 0.2 + TTL - 0.1 < took < 0.2 + TTL + 0.6, took


def test_lone_passive_node_takes_the_lease_once_free(cluster):
    solo = cluster("S", is_active=False)
    solo.start()
    took = solo.wait_role(Role.ACTIVE, timeout=2)
    assert took < 0.5 and solo.reasons()[-1][2] == "no-peer"


def test_failing_prepare_activation_gives_the_lease_back(cluster):
    attempts = []

    def prepare(epoch):
        attempts.append(epoch)
        if len(attempts) == 1:
            raise RuntimeError("event stream not ready")

    solo = cluster("S", is_active=True, prepare=prepare)
    solo.start()
    solo.wait_role(Role.ACTIVE, timeout=2)
    assert solo.reasons() == [("starting", "passive", "start"), ("passive", "active", "no-peer")]
    assert len(attempts) == 2 and attempts[1] == attempts[0] + 1
    assert solo.node.epoch == attempts[1]


def test_renewals_failing_demote_before_the_lease_expires(cluster):
    a, b = pair(cluster)
    at_demotion = {}
    looked = threading.Event()

    def look(old, new, node):  # runs in A's keeper thread at the moment it demotes
        if new is Role.PASSIVE:
            at_demotion["t"] = time.monotonic()
            at_demotion["lease"] = read_lease(cluster.admin)
            looked.set()

    a.node.subscribe(look)
    cut = time.monotonic()
    a.db.fail = True
    assert looked.wait(2), a.reasons()
    print(f"demoted {at_demotion['t'] - cut:.2f}s after the database was cut off, "
          f"{at_demotion['lease'].remaining:.2f}s before the lease expired")
    assert a.reasons()[-1] == ("active", "passive", "lease-expired")
    lease = at_demotion["lease"]
    # Demoted while the lease still had time left by the database's own clock.
    assert lease.holder == "A" and lease.expires_at > lease.db_now, lease
    assert at_demotion["t"] - cut < TTL
    with pytest.raises(NotActive):
        a.node.write_claim()
    # The peer sees "active": false and takes over once the lease has expired.
    b.wait_role(Role.ACTIVE, timeout=3)
    assert b.node.epoch == lease.epoch + 1
    a.db.fail = False
    stays(a, Role.PASSIVE, 0.5)


def test_paused_leader_wakes_up_passive_and_writes_nothing(cluster):
    a, b = pair(cluster)
    epoch = a.node.epoch
    a.db.running.clear()  # SIGSTOP: no database call and no /health answer from A
    a.health.running.clear()
    time.sleep(TTL - RENEW)
    with pytest.raises(NotActive):
        a.node.write_claim()  # past its local deadline even before its keeper runs again
    b.wait_role(Role.ACTIVE, timeout=3)
    a.db.running.set()  # SIGCONT
    a.health.running.set()
    a.wait_role(Role.PASSIVE, timeout=2)
    assert a.reasons()[-1][2] in ("lease-expired", "lease-lost")
    stays(a, Role.PASSIVE, 0.6)
    assert b.node.role is Role.ACTIVE and b.node.epoch == epoch + 1
    assert a.node.leader_url == b.health.url


def test_no_false_failover_when_the_active_pauses_and_the_passive_sees_it_down(cluster):
    """The health check informs, the lease decides: the passive believes the peer is down
    the whole time (its PEER_URL is a closed port) and the active is frozen for 0.5 s every
    1.5 s for 8 s, yet nobody changes role."""
    ha = HealthServer()
    a = cluster("A", is_active=True, peer=closed_port_url(), health=ha)
    b = cluster("B", is_active=False, peer=closed_port_url())
    assert a.start() is Role.ACTIVE and b.start() is Role.PASSIVE
    stop = threading.Event()
    pauses = [0]

    def pauser():
        while not stop.wait(1.0):
            pauses[0] += 1
            a.db.running.clear()
            a.health.running.clear()
            time.sleep(0.5)
            a.db.running.set()
            a.health.running.set()

    thread = threading.Thread(target=pauser, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 8.0
        while time.monotonic() < end:
            assert a.node.role is Role.ACTIVE, a.reasons()
            assert b.node.role is Role.PASSIVE, b.reasons()
            time.sleep(0.05)
        assert b.monitor.peer_down is True
    finally:
        stop.set()
        thread.join()
    assert pauses[0] >= 5
    assert len(a.changes) == 1 and len(b.changes) == 1


# -- request handlers saturating the database ------------------------------------------------
# On SQLite a renewal needs the file's single write lock, so writers queue behind one another
# and each holds the lock only briefly, but there are many of them (like the node's 16 HTTP
# workers). On PostgreSQL a renewal needs no lock a writer holds, so the writers are slow and
# outnumber the request pool's connections.
STARVING_WRITERS = {"sqlite": (16, 0.1), "postgresql": (16, 1.0)}  # (threads, seconds held)


def test_active_keeps_renewing_while_request_writers_saturate_the_database(cluster):
    """Fenced write transactions from many request handlers keep the request pool (and, on
    SQLite, the write lock) busy for several TTLs: the keeper still renews on time, so the
    active node never steps down and the passive never takes over."""
    a, b = pair(cluster)
    writers, held = STARVING_WRITERS[a.db.dialect]
    stop = threading.Event()
    committed = [0]
    errors: list[BaseException] = []

    def write_slowly() -> None:
        while not stop.is_set():
            try:
                node_id, epoch = a.node.write_claim()
            except NotActive:
                time.sleep(0.02)
                continue
            try:
                # The request handlers' pool, as fenced_write uses it: the fencing check holds
                # what a writer holds (SQLite's write lock; PostgreSQL's gate, shared).
                with a.db.db.write() as s:
                    assert_holder(s, node_id, epoch)
                    time.sleep(held)  # the handler's own work, inside its transaction
                committed[0] += 1
            except (Fenced, StoreUnavailable):
                time.sleep(0.02)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=write_slowly, daemon=True) for _ in range(writers)]
    for t in threads:
        t.start()
    try:
        stays(a, Role.ACTIVE, 5 * TTL)
    finally:
        stop.set()
        for t in threads:
            t.join(held + 5)
    assert errors == []
    assert committed[0] >= writers, committed  # the load was real: the writers got through
    assert a.reasons() == [("starting", "active", "start")]
    assert b.reasons() == [("starting", "passive", "start")]
