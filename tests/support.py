"""Helpers for tests that talk to real hachat processes over real sockets."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent


def required(what: str) -> bool:
    """In CI (or when asked) a missing dependency fails a test instead of skipping it."""
    flag = {"pg": "HACHAT_REQUIRE_PG", "browser": "HACHAT_REQUIRE_BROWSER",
            "haproxy": "HACHAT_REQUIRE_HAPROXY"}[what]
    return os.environ.get("CI") == "true" or os.environ.get(flag) == "1"


def require_pg() -> None:
    """Skip (locally) or fail (CI) when PostgreSQL is not reachable."""
    import pytest

    import dbutil

    if dbutil.pg_available():
        return
    if required("pg"):
        pytest.fail("PostgreSQL at 127.0.0.1:5432 is required (CI) but does not answer")
    pytest.skip("PostgreSQL at 127.0.0.1:5432 is not running")


def free_port() -> int:
    """A port the kernel says is free right now (bind to 0, read it, release it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw) if self.raw else None


def call(base: str, method: str, path: str, body: Any = None, *, token: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10.0) -> Reply:
    """One request on a fresh connection. `body` may be bytes (sent as is) or JSON-able."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


@contextlib.contextmanager
def fresh_database(kind: str, workdir: Path) -> Iterator[str]:
    """A new, empty database URL of `kind` ("sqlite" or "postgres"), dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'pair.db'}"
        return
    require_pg()
    import dbutil

    url = dbutil.create_pg_database()
    try:
        yield url
    finally:
        dbutil.drop_pg_database(url)


class NodeProcess:
    """`python -m hachat serve` in its own process, with its own environment and log file."""

    def __init__(self, env: dict[str, str], workdir: Path, name: str = "node") -> None:
        self.port = int(env.get("PORT") or free_port())
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HOST": "127.0.0.1", "LOG_LEVEL": "INFO",
                    "NODE_ID": name, "PUBLIC_URL": self.url, **env, "PORT": str(self.port)}
        for key in ("DB_USER", "DB_PASSWORD", "DB_HOST", "DB_PORT", "DB_NAME"):
            if key not in env:
                self.env.pop(key, None)
        self.workdir = workdir
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 20.0) -> NodeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "hachat", "serve"],
                                         env=self.env, cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT)
        if wait:
            self.wait_health(timeout)
        return self

    def wait_health(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                reply = call(self.url, "GET", "/health", timeout=1.0)
                if reply.status == 200:
                    return reply.json
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not answer /health: {last}\n{self.log()}")

    def wait_active(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if call(self.url, "GET", "/health", timeout=1.0).json.get("active"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not become active\n{self.log()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


class ChatUser:
    """A logged-in user, for tests."""

    def __init__(self, base: str, username: str, password: str = "password123") -> None:
        self.base = base
        reply = call(base, "POST", "/login", {"username": username, "password": password})
        assert reply.status in (200, 201), reply.raw
        self.id: int = reply.json["userId"]
        self.username = username
        self.token: str = reply.json["token"]

    def __call__(self, method: str, path: str, body: Any = None, **kw: Any) -> Reply:
        return call(self.base, method, path, body, token=self.token, **kw)


class BackgroundLoop:
    """A test's loop on a daemon thread: `start()` runs `run()`, which checks `stopping`;
    `halt()` sets it and waits (up to `join_timeout`) for the thread to end."""

    join_timeout = 10.0

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.run, daemon=True)

    def start(self):  # -> the subclass
        self._thread.start()
        return self

    def halt(self) -> None:
        self.stopping.set()
        self._thread.join(self.join_timeout)
        assert not self._thread.is_alive(), f"{type(self).__name__} did not stop"

    def run(self) -> None:
        raise NotImplementedError


class EventFollower(BackgroundLoop):
    """Follows a user's `GET /events` from `cursor` on a thread, in one-second polls, until
    `stop()`, which returns every event that arrived, in order (and fails on any non-200)."""

    def __init__(self, user: ChatUser, cursor: int) -> None:
        super().__init__()
        self.user = user
        self.cursor = cursor
        self.events: list[dict] = []
        self.failures: list[str] = []

    def stop(self) -> list[dict]:
        self.halt()
        assert not self.failures, self.failures
        return self.events

    def run(self) -> None:
        while not self.stopping.is_set():
            reply = self.user("GET", f"/events?since={self.cursor}&timeout=1", timeout=10)
            if reply.status != 200:
                self.failures.append(reply.raw)
                return
            self.events.extend(reply.json["events"])
            self.cursor = reply.json["cursor"]


class HeldNotify:
    """PostgreSQL: a `POST /notify` held in flight, so that later writes commit before it.

    A row inserted in an open transaction takes the node's next stream position first; the
    notify then gets that position and waits on the row's key. `release()` rolls the row
    back, lets the notify commit and returns its reply. `position` is the held position."""

    def __init__(self, engine: Any, node_url: str, user: ChatUser, group_id: int,
                 message: Any, admin_token: str = "admin-secret") -> None:
        self._next = lambda: call(node_url, "GET", "/stats", token=admin_token
                                  ).json["hub"]["next_position"]
        self.position = self._next()
        from sqlalchemy import text

        self._blocker = engine.connect()
        self._blocker.execute(text(
            "INSERT INTO events (position, kind, payload, created_at, epoch) "
            "VALUES (:p, 'test.hold', '{}', now(), 0)"), {"p": self.position})
        self._reply: dict[str, Reply] = {}
        self._thread = threading.Thread(target=lambda: self._reply.setdefault(
            "reply", user("POST", f"/notify/{group_id}", {"message": message})))
        self._thread.start()
        deadline = time.monotonic() + 5
        while self._next() == self.position and time.monotonic() < deadline:
            time.sleep(0.01)  # until the notify has taken the position

    def release(self) -> Reply | None:
        if self._blocker is not None:
            self._blocker.rollback()
            self._blocker.close()
            self._blocker = None
        self._thread.join(10)
        return self._reply.get("reply")
