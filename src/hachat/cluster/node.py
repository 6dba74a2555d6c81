"""`Node`: this process's role, lease epoch and write admission, shared by every thread.

One lock guards the state. Transitions are additionally serialised with the calls to their
listeners, so listeners see role changes in the order they happened; listeners run outside the
state lock (they may read the node) and must not wait for another thread that changes roles.
What the node reports also changes without a transition, when the keeper reads the lease row
or the monitor hears from the peer (the leader, the epoch): watchers (`watch`) are told then,
in the same order as the transitions' listeners.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hachat.cluster.roles import InvalidTransition, Role, allowed
from hachat.settings import ClusterSettings

log = logging.getLogger("hachat.cluster")

Listener = Callable[[Role, Role, "Node"], None]
Watcher = Callable[["Node"], None]


class NotActive(Exception):
    """This node may not write now; `leader_url` is where the active node is, when known."""

    def __init__(self, leader_url: str | None) -> None:
        super().__init__(f"not the active node (active: {leader_url or 'unknown'})")
        self.leader_url = leader_url


class Node:
    """The role machine of one node plus what it knows of the lease and of its peer."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._order = threading.RLock()  # transition + its notifications, one at a time
        self._role = Role.STARTING
        self._epoch = 0
        self._deadline = -math.inf  # time.monotonic() after which no write is admitted
        self._reason = "start"
        self._lease_holder: str | None = None
        self._lease_holder_url: str | None = None
        self._peer_active = False
        self._listeners: list[Listener] = []
        self._watchers: list[Watcher] = []

    # -- identity -------------------------------------------------------------------------
    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def public_url(self) -> str:
        return self.settings.public_url

    @property
    def peer_url(self) -> str | None:
        return self.settings.peer_url

    # -- state ----------------------------------------------------------------------------
    @property
    def role(self) -> Role:
        with self._lock:
            return self._role

    def state(self) -> tuple[Role, int]:
        """(role, epoch), read together."""
        with self._lock:
            return self._role, self._epoch

    @property
    def epoch(self) -> int:
        """The lease epoch while active, else the last one known."""
        with self._lock:
            return self._epoch

    @property
    def reason(self) -> str:
        """The reason given for the last transition."""
        with self._lock:
            return self._reason

    @property
    def alive(self) -> bool:
        with self._lock:
            return self._role is not Role.FALLEN

    @property
    def is_active(self) -> bool:
        """Active and within the lease this node last renewed (what `write_claim` admits)."""
        with self._lock:
            return self._role is Role.ACTIVE and time.monotonic() < self._deadline

    @property
    def leader_url(self) -> str | None:
        with self._lock:
            return self._leader_locked()

    @property
    def lease_deadline(self) -> float:
        """`time.monotonic()` value after which this node admits no write (set by the keeper)."""
        with self._lock:
            return self._deadline

    @lease_deadline.setter
    def lease_deadline(self, value: float) -> None:
        with self._lock:
            self._deadline = value

    def _leader_locked(self) -> str | None:
        if self._role is Role.ACTIVE:
            return self.public_url if time.monotonic() < self._deadline else None
        if self._lease_holder_url and self._lease_holder != self.node_id:
            return self._lease_holder_url
        if self._peer_active and self.peer_url:
            return self.peer_url
        return None

    # -- transitions ----------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(old, new, node)` after every transition; returns an unsubscribe."""
        return self._add_callback(self._listeners, listener)

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher(node)` whenever what `snapshot()` reports changes without a
        transition: the leader or the epoch learnt from the lease row or from the peer's
        /health. Called from the thread that learnt it, serialised with the transitions'
        listeners. Returns an unwatch."""
        return self._add_callback(self._watchers, watcher)

    def _add_callback(self, callbacks: list, callback: Callable) -> Callable[[], None]:
        with self._lock:
            callbacks.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in callbacks:
                    callbacks.remove(callback)

        return remove

    def transition(self, new: Role, reason: str, epoch: int | None = None, *,
                   only_from: Role | None = None, only_epoch: int | None = None,
                   lease_deadline: float | None = None) -> bool:
        """Move to `new`; True when the role changed.

        Same role: no-op, False. A pair not in `TRANSITIONS`: `InvalidTransition`.
        `only_from` / `only_epoch`: change only if the role / epoch is still that one (else
        False, nothing logged) — for callers racing with other threads. Becoming ACTIVE needs
        `epoch`; `lease_deadline` (monotonic) is set atomically with the change.
        """
        with self._order:
            with self._lock:
                old = self._role
                if only_from is not None and old is not only_from:
                    return False
                if only_epoch is not None and self._epoch != only_epoch:
                    return False
                if new is old:
                    return False
                if not allowed(old, new):
                    raise InvalidTransition(old, new)
                if new is Role.ACTIVE and epoch is None:
                    raise ValueError("becoming active needs the lease epoch")
                if epoch is not None:
                    self._epoch = epoch
                if lease_deadline is not None:
                    self._deadline = lease_deadline
                if new is not Role.ACTIVE:
                    self._deadline = -math.inf
                self._role = new
                self._reason = reason
                shown_epoch = self._epoch
                listeners = list(self._listeners)
                self._changed.notify_all()
            log.info("role %s -> %s epoch=%d reason=%s", old.value, new.value, shown_epoch, reason)
            for listener in listeners:
                try:
                    listener(old, new, self)
                except Exception:
                    log.exception("role listener %r failed on %s -> %s", listener, old.value,
                                  new.value)
            return True

    def demote(self, reason: str, epoch: int | None = None) -> bool:
        """ACTIVE -> PASSIVE (e.g. a write was fenced). With `epoch`, only if still that epoch."""
        return self.transition(Role.PASSIVE, reason, only_from=Role.ACTIVE, only_epoch=epoch)

    def wait_for_role(self, *roles: Role, timeout: float | None = None) -> bool:
        """Block until the role is one of `roles`; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._role in roles, timeout)

    # -- facts reported by the keeper and the monitor --------------------------------------
    def extend_lease(self, epoch: int, deadline: float) -> bool:
        """After a successful renewal: move the local deadline, if still active under `epoch`."""
        with self._lock:
            if self._role is Role.ACTIVE and self._epoch == epoch:
                self._deadline = deadline
                return True
            return False

    def observe_lease(self, holder: str | None, holder_url: str | None,
                      epoch: int | None) -> None:
        """What the lease row says (holder None when it is free or expired)."""
        with self._observing():
            self._lease_holder = holder
            self._lease_holder_url = holder_url if holder else None
            if self._role is not Role.ACTIVE and epoch is not None and epoch > self._epoch:
                self._epoch = epoch

    def observe_peer(self, report: dict[str, Any] | None) -> None:
        """The peer's last /health answer (None when it did not answer)."""
        with self._observing():
            self._peer_active = bool(report and report.get("status") == "alive"
                                     and report.get("active") is True)

    @contextmanager
    def _observing(self) -> Iterator[None]:
        """Run the body under the state lock, in order with the transitions; tell the
        watchers afterwards if what `snapshot()` reports (the epoch, the leader) changed."""
        with self._order:
            with self._lock:
                before = self._epoch, self._leader_locked()
                yield
                changed = (self._epoch, self._leader_locked()) != before
                watchers = list(self._watchers) if changed else []
            self._notify_watchers(watchers)

    def _notify_watchers(self, watchers: list[Watcher]) -> None:
        for watcher in watchers:
            try:
                watcher(self)
            except Exception:
                log.exception("node watcher %r failed", watcher)

    # -- admission and reporting ---------------------------------------------------------
    def write_claim(self) -> tuple[str, int]:
        """(node_id, epoch) to write under, or `NotActive(leader_url)`.

        Admits only while ACTIVE and before the local lease deadline, so a node paused past
        its lease writes nothing on waking even before its keeper notices (the database's
        fencing check inside the write transaction is the final word).
        """
        with self._lock:
            if self._role is Role.ACTIVE and time.monotonic() < self._deadline:
                return self.node_id, self._epoch
            leader = self._leader_locked()
        raise NotActive(leader)

    def snapshot(self) -> dict[str, Any]:
        """The /health body."""
        with self._lock:
            role = self._role
            return {
                "status": "down" if role is Role.FALLEN else "alive",
                "active": role is Role.ACTIVE and time.monotonic() < self._deadline,
                "node": self.node_id,
                "epoch": self._epoch,
                "peer": self.peer_url,
                "role": role.value,
                "leader": self._leader_locked(),
            }

    def __repr__(self) -> str:
        return f"<Node {self.node_id} {self.role.value} epoch={self.epoch}>"
