"""StatusWatch: the node-state long-poll behind GET /subscribe/status.

The node publishes its state (role, epoch, active node URL...) whenever it may have changed;
a real change bumps `version` and answers every parked watcher at once. A watcher that asks
with a version other than the current one (older, or from another process) is answered at once.

A client following a failover carries the version it last saw to the other node, or to the
same node restarted: each process therefore counts from its own start (`process_first_version`)
so that a version seen on one process is never, by chance, another's current one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from hachat.http.messages import Deferred, LoopHandle, Response
from hachat.http.wire import internal_error

log = logging.getLogger(__name__)

StatusRender = Callable[[dict, int, bool], Response]

def process_first_version() -> int:
    """A first version no other process has counted through: the microseconds since the Unix
    epoch at start-up (16 digits, well inside the integers a JavaScript client reads exactly,
    2**53, until the year 2255). Two processes' versions meet only if one changed state more
    times than microseconds passed between their starts."""
    return time.time_ns() // 1000


class _StatusWaiter:
    __slots__ = ("watch", "since_version", "render", "deferred", "registered")

    def __init__(self, watch: StatusWatch, since_version: int | None, timeout: float,
                 render: StatusRender) -> None:
        self.watch = watch
        self.since_version = since_version
        self.render = render
        self.registered = False
        self.deferred = Deferred(timeout, self.on_timeout, self.on_cancel)

    def on_timeout(self) -> Response:
        state, version = self.watch._unregister(self)
        changed = self.since_version is not None and self.since_version != version
        return self.render(state, version, changed)

    def on_cancel(self) -> None:
        self.watch._unregister(self)


class StatusWatch:
    """Versioned node state with long-poll waiters. All public methods are thread-safe."""

    def __init__(self, loop: LoopHandle, state: dict | None = None, *,
                 first_version: int = 1) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._version = first_version
        self._state: dict = dict(state) if state else {}
        self._waiters: set[_StatusWaiter] = set()

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    @property
    def state(self) -> dict:
        """A copy of the current state."""
        with self._lock:
            return dict(self._state)

    def snapshot(self) -> tuple[dict, int]:
        """(a copy of the state, its version), read together."""
        with self._lock:
            return dict(self._state), self._version

    def publish(self, state: dict) -> None:
        """Set the state; if it differs from the current one, bump the version and answer
        every waiter with render(state, version, True) (on the loop thread)."""
        with self._lock:
            if state == self._state:
                return
            snapshot = dict(state)
            self._state = snapshot
            self._version += 1
            version = self._version
            waiters = list(self._waiters)
            self._waiters.clear()
            for w in waiters:
                w.registered = False
        if waiters:
            self._loop.call_soon_threadsafe(self._wake, waiters, snapshot, version)

    changed = publish  # the name used in docs/ARCHITECTURE.md

    def wait(self, since_version: int | None, timeout: float,
             render: StatusRender) -> Deferred:
        """Park until the state changes from `since_version`; answered at once if
        `since_version` is given and is not the current version. On timeout:
        render(current state, version, changed=False)."""
        with self._lock:
            if since_version is None or since_version == self._version:
                waiter = _StatusWaiter(self, since_version, timeout, render)
                waiter.registered = True
                self._waiters.add(waiter)
                return waiter.deferred
            state, version = self._state, self._version
        deferred = Deferred(timeout, lambda: render(*self.snapshot(), False))
        deferred.resolve(render(state, version, True))
        return deferred

    def close_all(self, response: Response) -> int:
        """Answer every waiter with `response` (e.g. at shutdown). Returns the count."""
        with self._lock:
            waiters = list(self._waiters)
            self._waiters.clear()
            for w in waiters:
                w.registered = False
        return sum(1 for w in waiters if w.deferred.resolve(response))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"waiters": len(self._waiters), "version": self._version}

    # -- internals -----------------------------------------------------------------------
    def _unregister(self, w: _StatusWaiter) -> tuple[dict, int]:
        with self._lock:
            if w.registered:
                w.registered = False
                self._waiters.discard(w)
            return self._state, self._version

    def _wake(self, waiters: list[_StatusWaiter], state: dict, version: int) -> None:
        """Loop thread: answer waiters, rendering once per distinct render callable."""
        cache: dict[Any, Response] = {}
        for w in waiters:
            key = w.render
            try:
                response = cache.get(key)
            except TypeError:
                key = response = None
            if response is None:
                try:
                    response = w.render(state, version, True)
                except Exception:
                    log.exception("render failed")
                    response = internal_error()
                if key is not None:
                    cache[key] = response
            w.deferred.resolve(response)
