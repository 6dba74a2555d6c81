"""`DeadlineWatch`: one long-lived thread that steps the node down when its lease deadline passes.

The keeper renews the lease; a renewal can hang (a black-holed network waits for the connect
timeout or TCP keepalive), and the node must stop admitting writes at its local deadline even
then. A timer thread started per renewal would do, but starting a thread costs most when the
process is starved of CPU, exactly when renewals are late: `Thread.start()` waits until the new
thread has run. This thread is started once and sleeps until the current deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from hachat.cluster.node import Node
from hachat.cluster.roles import Role

log = logging.getLogger("hachat.cluster.keeper")


class DeadlineWatch:
    """While `node` is ACTIVE, turn it PASSIVE ("lease-expired") once `time.monotonic()` reaches
    its lease deadline, unless the deadline was moved (renewed) in the meantime."""

    def __init__(self, node: Node, name: str = "hachat-lease-watchdog") -> None:
        self.node = node
        self.name = name
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        # A role change (becoming active gives a first deadline) means: look again now.
        self._unsubscribe = self.node.subscribe(lambda _old, _new, _node: self._wake.set())
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop watching (nothing is demoted any more: a crashed process demotes nothing)."""
        self._stopping.set()
        self._wake.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.is_set():
            # Cleared before looking, so a wake-up that comes while we look is not lost.
            self._wake.clear()
            try:
                delay = self._check()
            except Exception:  # the watchdog must outlive any surprise
                log.exception("lease watchdog check failed")
                delay = 0.05
            self._wake.wait(delay)

    def _check(self) -> float | None:
        """Demote if the deadline has passed; return how long to sleep (None: until woken)."""
        role, epoch = self.node.state()
        if role is not Role.ACTIVE:
            return None
        remaining = self.node.lease_deadline - time.monotonic()
        if remaining > 0:
            return remaining
        # `only_epoch`: a node that lost and retook the lease meanwhile is left alone.
        self.node.transition(Role.PASSIVE, "lease-expired", only_from=Role.ACTIVE,
                             only_epoch=epoch)
        return None
