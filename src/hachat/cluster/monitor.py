"""`PeerMonitor` (the original "sync manager"): polls the peer's `GET /health`.

The health check informs, the lease decides: `peer_down` only makes the keeper *try* to take
the lease, which the database grants only once the peer stopped renewing it.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from hachat.settings import ClusterSettings

log = logging.getLogger("hachat.cluster.monitor")

MAX_HEALTH_BODY = 64 * 1024


class PeerUnreachable(Exception):
    """The peer did not give a usable /health answer."""


def fetch_health(url: str, timeout: float) -> dict[str, Any]:
    """GET `{url}/health` and return its JSON object (any HTTP status), or raise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PeerUnreachable(f"bad peer URL {url!r}")
    conn_class = (http.client.HTTPSConnection if parts.scheme == "https"
                  else http.client.HTTPConnection)
    conn = conn_class(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path.rstrip("/") + "/health",
                     headers={"Accept": "application/json", "Connection": "close"})
        response = conn.getresponse()
        body = response.read(MAX_HEALTH_BODY)
    except (OSError, http.client.HTTPException) as exc:
        raise PeerUnreachable(f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()
    try:
        report = json.loads(body)
    except ValueError as exc:
        raise PeerUnreachable(f"HTTP {response.status}, not JSON") from exc
    if not isinstance(report, dict):
        raise PeerUnreachable(f"HTTP {response.status}, not a JSON object")
    return report


class PeerMonitor:
    """Every `health_interval`, ask the peer's /health (timeout `health_timeout`).

    `peer_down` is True when `health_failures` polls in a row failed, or the last answer says
    `status != "alive"` or `active` is not true; also when no peer is configured.
    Callbacks given to `subscribe` (and `on_change`) are called with the new `peer_down` value
    each time it flips, from the monitor thread.
    """

    def __init__(self, settings: ClusterSettings, node: Any = None,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.settings = settings
        self.node = node  # a Node (told each answer, for leader_url) or None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._report: dict[str, Any] | None = None
        self._down = self.peer_url is None
        self._polls = 0
        self._callbacks: list[Callable[[bool], None]] = [on_change] if on_change else []

    @property
    def peer_url(self) -> str | None:
        return self.settings.peer_url

    @property
    def peer_down(self) -> bool:
        with self._lock:
            return self._down

    @property
    def peer_report(self) -> dict[str, Any] | None:
        """The last answer, or None (no answer yet, or the last poll failed)."""
        with self._lock:
            return self._report

    @property
    def failures(self) -> int:
        """Consecutive failed polls."""
        with self._lock:
            return self._failures

    @property
    def polls(self) -> int:
        with self._lock:
            return self._polls

    def subscribe(self, callback: Callable[[bool], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def start(self) -> None:
        """Start polling (does nothing without a peer URL)."""
        if self.peer_url is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="hachat-peer-monitor",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout if timeout is not None else self.settings.health_timeout + 1.0)

    def poll_once(self) -> bool:
        """One health check; returns the resulting `peer_down`."""
        assert self.peer_url is not None
        try:
            report: dict[str, Any] | None = fetch_health(self.peer_url,
                                                         self.settings.health_timeout)
            error = None
        except PeerUnreachable as exc:
            report, error = None, str(exc)
        with self._lock:
            self._polls += 1
            was_down, old_failures = self._down, self._failures
            if report is None:
                self._failures += 1
                self._report = None
                self._down = self._failures >= self.settings.health_failures
            else:
                self._failures = 0
                self._report = report
                self._down = not (report.get("status") == "alive"
                                  and report.get("active") is True)
            down, failures = self._down, self._failures
            callbacks = list(self._callbacks) if down != was_down else []
        if self.node is not None:
            self.node.observe_peer(report)
        if error is not None and old_failures == 0:
            log.warning("peer %s health check failed: %s", self.peer_url, error)
        elif error is None and old_failures:
            log.info("peer %s answers again after %d failed checks", self.peer_url,
                     old_failures)
        if callbacks:
            if report is None:
                verdict = f"unreachable ({failures} failed checks)"
            elif report.get("status") != "alive":
                verdict = "down (it says so)"
            else:
                verdict = f"{report.get('role', 'not active')}, not active" if down else "active"
            log.info("peer %s is %s", self.peer_url, verdict)
            for callback in callbacks:
                try:
                    callback(down)
                except Exception:
                    log.exception("peer monitor callback %r failed", callback)
        return down

    def _run(self) -> None:
        interval = self.settings.health_interval
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # never let the sync manager die
                log.exception("peer monitor poll failed")
            # Fixed rate: a slow answer does not stretch the interval between checks.
            next_at = max(next_at + interval, time.monotonic())
            self._stop.wait(next_at - time.monotonic())
