"""Bounds on expensive, unauthenticated work: login attempts per client and concurrent
password hashing. A login flood must not take the worker threads chat requests need."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from hachat.http.messages import Deferred, HTTPError, Response

log = logging.getLogger("hachat.api")


class RateLimiter:
    """A token bucket per key (a client address): `rate` per second, up to `burst` at once."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated)
        self._lock = threading.Lock()

    def check(self, key: str, what: str = "login attempts from this address") -> None:
        """Take one token for `key`, or raise 429 (`too many <what>`) with the wait in
        Retry-After."""
        self._take(key, what, spend=True)

    def require(self, key: str, what: str) -> None:
        """Raise 429 like `check` when `key` has no token left, but take none: for limits that
        count only some outcomes (`spend` them once known)."""
        self._take(key, what, spend=False)

    def spend(self, key: str) -> None:
        """Take one token for `key`, even the last (the bucket may go below zero: the next
        attempts then wait longer)."""
        now = time.monotonic()
        with self._lock:
            tokens = self._refilled(key, now)
            self._buckets[key] = (max(tokens - 1.0, -self.burst), now)
            if len(self._buckets) > self.max_keys:
                self._forget_full(now)

    def _refilled(self, key: str, now: float) -> float:
        tokens, updated = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - updated) * self.rate)

    def _take(self, key: str, what: str, spend: bool) -> None:
        now = time.monotonic()
        with self._lock:
            tokens = self._refilled(key, now)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = max(1, round((1.0 - tokens) / self.rate + 0.5))
                raise HTTPError(429, "too_many_requests", f"too many {what}; retry in {wait} s",
                                headers=(("Retry-After", str(wait)),))
            if not spend:
                return
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: they hold nothing a fresh bucket would not."""
        refill = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill}

    def __len__(self) -> int:
        return len(self._buckets)


class SideLane:
    """A few threads of its own for expensive work (password hashing), so that a flood of it
    queues here and never in front of the chat requests on the server's worker pool.

    `submit` is called on the server's loop thread and returns a `Deferred` at once; a full
    queue answers 503 at once instead of growing without bound."""

    def __init__(self, threads: int, queue_size: int, timeout: float = 30.0,
                 name: str = "side-lane") -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.timeout = timeout
        for i in range(threads):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, job: Callable[[], Response]) -> Deferred:
        deferred = Deferred(self.timeout, _busy, working=True)
        try:
            self._queue.put_nowait((job, deferred))
        except queue.Full:
            raise HTTPError(503, "busy", "too many logins are waiting; retry shortly",
                            headers=(("Retry-After", "1"),)) from None
        return deferred

    def _work(self) -> None:
        while True:
            job, deferred = self._queue.get()
            if deferred.done:
                continue  # its client left or it timed out while queued
            try:
                response = job()
            except HTTPError as exc:
                response = exc.to_response()
            except Exception:
                log.exception("side-lane job failed")
                response = HTTPError(500, "internal_error", "internal server error").to_response()
            deferred.resolve(response)


def _busy() -> Response:
    return HTTPError(503, "busy", "the login took too long; retry shortly",
                     headers=(("Retry-After", "1"),)).to_response()
