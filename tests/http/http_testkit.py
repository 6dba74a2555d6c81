"""Raw-socket helpers for the HTTP server tests: a tiny app, a client that reads responses."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hachat.http.messages import Deferred, HTTPError, Request, Response, dumps


class Route:
    """A handler: `fn(request)`, run on a worker when `blocking`."""

    def __init__(self, fn: Callable[[Request], Any], blocking: bool = False) -> None:
        self.fn = fn
        self.blocking = blocking

    def __call__(self, request: Request) -> Any:
        return self.fn(request)


def gated(handler: Callable[[Request], Any]) -> tuple[Route, threading.Event]:
    """A worker route that runs `handler` only once the returned gate is set (or after 5 s),
    to hold a request in a worker thread while a test does something to its connection."""
    gate = threading.Event()

    def run(request: Request) -> Any:
        gate.wait(5)
        return handler(request)

    return Route(run, blocking=True), gate


def echo(request: Request) -> Response:
    return Response(200, dumps({
        "method": request.method,
        "target": request.target,
        "path": request.path,
        "query": request.query_string,
        "headers": request.headers,
        "body": request.body.decode("latin-1"),
        "version": request.http_version,
        "keep_alive": request.keep_alive,
        "client": list(request.client_address),
        "thread": threading.current_thread().name,
    }))


def _boom(request: Request) -> Response:
    raise RuntimeError("boom")


def _slow(request: Request) -> Response:
    time.sleep(float(request.query_string or "0.3"))
    return Response(200, b'{"slow":true}')


BIG = b"x" * (8 * 1024 * 1024)


class App:
    """Routes by exact path; counts hits; keeps the Deferreds it parks."""

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        self.hits: Counter[str] = Counter()
        self.parked: list[Deferred] = []
        self.cancelled: list[Deferred] = []
        self.lock = threading.Lock()
        self.routes: dict[str, Route] = {
            "/health": Route(lambda r: Response(200, b'{"status":"alive","active":true}')),
            "/echo": Route(echo),
            "/worker": Route(echo, blocking=True),
            "/boom": Route(_boom),
            "/boom-worker": Route(_boom, blocking=True),
            "/slow": Route(_slow, blocking=True),
            "/park": Route(self._park),
            "/park-worker": Route(self._park, blocking=True),
            "/close": Route(lambda r: Response(200, b"{}", close=True)),
            "/teapot": Route(self._teapot),
            "/work": Route(self._work, blocking=True),
            "/big": Route(lambda r: Response(200, BIG, "text/plain")),
        }
        self.routes.update(routes or {})

    def resolve(self, request: Request) -> Route:
        with self.lock:
            self.hits[request.path] += 1
        route = self.routes.get(request.path)
        if route is None:
            raise HTTPError(404, "not_found", f"no route for {request.path}")
        return route

    def _teapot(self, request: Request) -> Response:
        raise HTTPError(418, "teapot", "short and stout", headers=[("X-Tea", "earl grey")])

    def _park(self, request: Request) -> Deferred:
        timeout = float(request.query_string or "30")
        holder: list[Deferred] = []

        def on_cancel() -> None:
            with self.lock:
                self.cancelled.append(holder[0])

        deferred = Deferred(timeout, lambda: Response(200, b'{"timeout":true}'), on_cancel)
        holder.append(deferred)
        with self.lock:
            self.parked.append(deferred)
        return deferred

    def _work(self, request: Request) -> Deferred:
        """Like a queued write: a `working` Deferred that another thread answers after
        `?seconds` (0.2 by default), echoing the request body."""
        deferred = Deferred(30, lambda: Response(504, b'{"timeout":true}'),
                            lambda: self.cancelled.append(deferred), working=True)
        with self.lock:
            self.parked.append(deferred)
        answer = Response(201, dumps({"stored": request.body.decode("latin-1")}))
        timer = threading.Timer(float(request.query_string or "0.2"), deferred.resolve, (answer,))
        timer.daemon = True
        timer.start()
        return deferred


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One raw connection. `read_response` parses exactly one response from the stream."""

    def __init__(self, address: tuple[str, int], timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def get(self, path: str = "/health", extra: str = "", version: str = "1.1") -> None:
        self.send(f"GET {path} HTTP/{version}\r\nHost: test\r\n{extra}\r\n".encode())

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed; unparsed: {self.buf[:200]!r}")
        self.buf += data

    def read_response(self, head: bool = False) -> Reply:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        raw_head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        version, status, *reason = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            key = name.strip().lower()
            assert key not in headers, f"duplicate response header {key}"
            headers[key] = value.strip()
        length = 0 if head or int(status) < 200 else int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return Reply(int(status), reason[0] if reason else "", headers, body)

    def read_final(self) -> Reply:
        """The next final response, skipping interim (1xx) ones."""
        while True:
            reply = self.read_response()
            if reply.status >= 200:
                return reply

    def request(self, path: str = "/health", extra: str = "") -> Reply:
        self.get(path, extra)
        return self.read_response()

    def wait_closed(self, timeout: float = 3.0) -> bool:
        """True if the server closes the connection (after any unread bytes) in time."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
