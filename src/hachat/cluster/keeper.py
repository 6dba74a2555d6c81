"""`LeaseKeeper`: the thread that holds, renews, gives up and takes the database lease.

The lease decides, the health check informs. Only the database grants the lease (one row,
expiry judged by the database's clock, a new epoch on every acquisition), so two nodes that
cannot see each other still never both hold it. The local monotonic clock is used for one
thing only: demoting ourselves *before* the lease can have expired (Patroni's lesson), so a
node that was paused, or cannot reach the database, stops admitting writes in time.

The lease statements run on the database's control lane (`Database.control`: connections of
the keeper's own), so a node busy with requests does not make its own renewals late; and one
long-lived `DeadlineWatch` thread enforces the local deadline even while a renewal hangs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from hachat.cluster.monitor import PeerMonitor
from hachat.cluster.node import Node
from hachat.cluster.roles import Role
from hachat.cluster.watchdog import DeadlineWatch
from hachat.settings import ClusterSettings
from hachat.store import lease as store_lease
from hachat.store.errors import StoreUnavailable

log = logging.getLogger("hachat.cluster.keeper")

# Wait this much past the expiry the database reported before trying to take a lease.
EXPIRY_SLACK = 0.02
# A lease expired (by the database clock) for this many TTLs is taken even when the peer still
# answers /health: a stuck peer must not block the cluster forever.
FREE_LEASE_TTLS = 1.0


class LeaseKeeper:
    """Drives `node` through its roles from the database lease and the `monitor`'s verdict.

    `prepare_activation(epoch)` runs after the lease is won and before the node turns ACTIVE
    (e.g. reset the event stream); if it raises, the lease is released and the node stays
    passive. It may also run for an acquisition that a concurrent `fall()` then voids.
    """

    def __init__(self, settings: ClusterSettings, node: Node, db: Any,
                 monitor: PeerMonitor | None = None,
                 prepare_activation: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.node = node
        self.db = db
        self.monitor = monitor
        self.prepare_activation = prepare_activation
        self.ttl = settings.lease_ttl
        self.renew_interval = settings.lease_renew_interval
        self.safety_margin = min(self.renew_interval, self.ttl / 4)
        # No preemption: the lease this node gave up on /fall is left to a live peer for this
        # long after the release: twice what the peer needs (one health check to see the fall,
        # one renew tick to read the lease and take it), so a peer slowed by a busy machine
        # still wins. Free for longer, the peer is not taking it: this node may.
        self.peer_grace = 2 * (settings.health_interval + self.renew_interval)
        self._given_up_epoch: int | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch = DeadlineWatch(node)
        self._next_renew = 0.0
        self._db_failing = False
        if monitor is not None:
            monitor.subscribe(lambda _down: self.wake())

    # -- public ---------------------------------------------------------------------------
    def start(self, wait: float | None = 10.0) -> Role:
        """Start the thread; wait (up to `wait` s) until the start decision is made."""
        if self._thread is None:
            self._stopping.clear()
            self._watch.start()
            self._thread = threading.Thread(target=self._run, name="hachat-lease-keeper",
                                            daemon=True)
            self._thread.start()
        if wait:
            self.node.wait_for_role(Role.PASSIVE, Role.ACTIVE, Role.FALLEN, timeout=wait)
        return self.node.role

    def stop(self, release: bool = True, timeout: float | None = None) -> None:
        """Stop the thread. With `release`, an active node turns passive and gives the lease
        up so the peer takes over at once; without it, nothing is touched (a crash)."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout if timeout is not None else self.ttl + 5.0)
        self._watch.stop()
        if release:
            role, epoch = self.node.state()
            if role is Role.ACTIVE and self.node.transition(
                    Role.PASSIVE, "shutdown", only_from=Role.ACTIVE, only_epoch=epoch):
                self._release(epoch)

    def fall(self, reason: str = "fall") -> bool:
        """ACTIVE/PASSIVE/STARTING -> FALLEN; an active node releases the lease at once."""
        while True:
            role, epoch = self.node.state()
            if role is Role.FALLEN:
                return False
            if self.node.transition(Role.FALLEN, reason, only_from=role,
                                    only_epoch=epoch if role is Role.ACTIVE else None):
                if role is Role.ACTIVE:
                    self._given_up_epoch = epoch
                    self._release(epoch)
                self.wake()
                return True

    def revive(self, reason: str = "revive") -> bool:
        """FALLEN -> PASSIVE (never straight to active: no preemption)."""
        changed = self.node.transition(Role.PASSIVE, reason, only_from=Role.FALLEN)
        self.wake()
        return changed

    def wake(self) -> None:
        """Act now instead of at the next tick (role or peer verdict changed)."""
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._start_decision()
        except Exception:
            log.exception("lease keeper start failed; staying passive")
            self.node.transition(Role.PASSIVE, "start-error", only_from=Role.STARTING)
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                role = self.node.role
                if role is Role.ACTIVE:
                    delay = self._active_tick()
                elif role is Role.PASSIVE:
                    delay = self._passive_tick()
                else:
                    delay = self._fallen_tick()
            except Exception:
                log.exception("lease keeper tick failed")
                delay = self.renew_interval
            if delay > 0:
                self._wake.wait(delay)

    def _start_decision(self) -> None:
        node = self.node
        if not self.settings.is_active:
            node.transition(Role.PASSIVE, "start", only_from=Role.STARTING)
            return
        t0 = time.monotonic()
        try:
            epoch = store_lease.try_acquire(self.db, node.node_id, node.public_url, self.ttl)
        except Exception as exc:
            self._db_error("acquire", exc)
            node.transition(Role.PASSIVE, "start-db-unavailable", only_from=Role.STARTING)
            return
        self._db_ok()
        if epoch is not None and self._activate(epoch, t0, "start", Role.STARTING):
            return
        reason = "start"
        if epoch is None:
            state = self._read_lease()
            if state is not None and state.holder:
                reason = f"lease-held-by-{state.holder}"
        node.transition(Role.PASSIVE, reason, only_from=Role.STARTING)

    def _active_tick(self) -> float:
        node = self.node
        role, epoch = node.state()
        if role is not Role.ACTIVE:
            return 0.0
        now = time.monotonic()
        if now >= node.lease_deadline:
            # Paused, or the database unreachable, for too long: the lease may be gone.
            node.transition(Role.PASSIVE, "lease-expired", only_from=Role.ACTIVE,
                            only_epoch=epoch)
            return 0.0
        if now < self._next_renew:
            return min(self._next_renew, node.lease_deadline) - now
        t0 = time.monotonic()  # before the call: the renewal happens at or after t0
        self._next_renew = t0 + self.renew_interval
        # A renewal can hang (a black-holed network waits for the connect timeout): the
        # DeadlineWatch thread steps down at the deadline even while this one is stuck here.
        try:
            renewed = store_lease.renew(self.db, node.node_id, epoch, self.ttl)
        except Exception as exc:
            self._db_error("renew", exc)
            if time.monotonic() >= node.lease_deadline:
                node.transition(Role.PASSIVE, "lease-expired", only_from=Role.ACTIVE,
                                only_epoch=epoch)
                return 0.0
        else:
            self._db_ok()
            if renewed:
                node.extend_lease(epoch, t0 + self.ttl - self.safety_margin)
            else:
                node.transition(Role.PASSIVE, "lease-lost", only_from=Role.ACTIVE,
                                only_epoch=epoch)
                return 0.0
        return max(0.0, min(self._next_renew, node.lease_deadline) - time.monotonic())

    def _passive_tick(self) -> float:
        tick = self.renew_interval
        state = self._read_lease()
        reason = self._takeover_reason(state)
        if reason is None:
            if self._yielding_to_peer(state):
                # Left to the peer for now: look again when its grace runs out.
                return min(tick, max(0.0, self.peer_grace - state.free_for) + EXPIRY_SLACK)
            return tick
        if state is not None and state.holder and state.expires_at > state.db_now:
            # Held and not expired: acquiring would fail. Look again just after its expiry.
            return min(tick, state.expires_at - state.db_now + EXPIRY_SLACK)
        t0 = time.monotonic()
        try:
            epoch = store_lease.try_acquire(self.db, self.node.node_id, self.node.public_url,
                                            self.ttl)
        except Exception as exc:
            self._db_error("acquire", exc)
            return tick
        self._db_ok()
        if epoch is None:
            return tick
        self._activate(epoch, t0, reason, Role.PASSIVE)
        return 0.0

    def _fallen_tick(self) -> float:
        self._read_lease()  # only to know where the active node is
        return self.renew_interval

    # -- helpers --------------------------------------------------------------------------
    def _takeover_reason(self, state: Any) -> str | None:
        monitor = self.monitor
        if monitor is None or monitor.peer_url is None:
            return "no-peer"
        if self._yielding_to_peer(state):
            return None  # the lease this node gave up: a live peer is about to take it
        if monitor.peer_down:
            report = monitor.peer_report
            if report is None:
                return "peer-unreachable"
            if report.get("role") != Role.STARTING.value:  # a starting peer gets its chance
                return "peer-down"
        if state is not None:
            if not state.holder:
                return "lease-free"  # released on purpose (fall, graceful stop)
            if state.db_now - state.expires_at >= FREE_LEASE_TTLS * self.ttl:
                return "lease-free"  # expired long ago: the peer is stuck, /health or not
        return None

    def _yielding_to_peer(self, state: Any) -> bool:
        """True while this node, revived after giving the lease up on /fall, leaves that lease
        to its peer (no preemption).

        Only the lease this node gave up (same epoch: nobody took it since), only while the
        peer answered its last health check saying it is alive (a peer that does not answer
        or is down takes nothing), and only while that lease has been free for less than
        `peer_grace` by the database clock: a live peer takes a free lease within that, so
        longer means it will not (it fell too, say), and the lease is taken at once.
        """
        given_up, monitor = self._given_up_epoch, self.monitor
        if given_up is None or monitor is None or state is None or state.held \
                or state.epoch != given_up:
            return False
        report = monitor.peer_report
        if monitor.failures or report is None or report.get("status") != "alive":
            return False
        return state.free_for < self.peer_grace

    def _activate(self, epoch: int, t0: float, reason: str, only_from: Role) -> bool:
        node = self.node
        if self.prepare_activation is not None:
            try:
                self.prepare_activation(epoch)
            except Exception:
                log.exception("prepare_activation(%d) failed; giving the lease back", epoch)
                self._release(epoch)
                return False
        if time.monotonic() - t0 > self.renew_interval:
            # Preparing took a while: renew now so the first deadline is not already gone.
            t1 = time.monotonic()
            try:
                if store_lease.renew(self.db, node.node_id, epoch, self.ttl):
                    t0 = t1
            except Exception as exc:
                self._db_error("renew", exc)
        if node.transition(Role.ACTIVE, reason, epoch, only_from=only_from,
                           lease_deadline=t0 + self.ttl - self.safety_margin):
            self._next_renew = t0 + self.renew_interval
            return True
        # Someone moved the node meanwhile (e.g. fall()): do not keep a lease we won't use.
        self._release(epoch)
        return False

    def _read_lease(self) -> Any:
        try:
            state = store_lease.read_lease(self.db)
        except Exception as exc:
            self._db_error("read", exc)
            return None
        self._db_ok()
        held = bool(state.holder) and state.expires_at > state.db_now
        self.node.observe_lease(state.holder if held else None,
                                state.holder_url if held else None, state.epoch)
        return state

    def _release(self, epoch: int) -> None:
        try:
            store_lease.release(self.db, self.node.node_id, epoch)
        except Exception as exc:
            log.warning("could not release the lease (epoch %d): %s; it will expire", epoch,
                        exc)

    def _db_error(self, what: str, exc: Exception) -> None:
        if self._db_failing:
            log.debug("lease %s failed again: %s", what, exc)
            return
        self._db_failing = True
        if isinstance(exc, StoreUnavailable):
            log.warning("lease %s failed, database unavailable: %s", what, exc)
        else:
            log.error("lease %s failed", what, exc_info=exc)

    def _db_ok(self) -> None:
        if self._db_failing:
            self._db_failing = False
            log.info("database reachable again")
