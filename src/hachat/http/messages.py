"""The values that cross between the HTTP layer and an application.

These are the contract of `hachat.http`: the server builds `Request`s, the application
answers with `Response`s (now) or `Deferred`s (later), and raises `HTTPError` for errors.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, ending in a newline so that curl output stays one answer a line."""
    return (_dumps(obj) + "\n").encode("utf-8")


@dataclass(slots=True)
class Request:
    """One parsed request. Header names are lower-case; a repeated header keeps its values
    joined with ", " in `headers` (the parser-level checks for Host/Content-Length already ran).

    Header values are text decoded as UTF-8, as JSON bodies are, so the same characters arrive
    the same whichever way a client sends them. When a value is not UTF-8, `headers` is a
    `Headers`: reading that value raises a 400 (see there)."""

    method: str
    target: str  # raw request target, e.g. "/messages?groupId=1"
    path: str  # percent-decoded path, no query
    query_string: str
    headers: dict[str, str]
    body: bytes
    http_version: str  # "1.1" or "1.0"
    client_address: tuple[str, int] | tuple
    keep_alive: bool = True
    # Free slot for the application (e.g. the resolved route's path parameters).
    context: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


@dataclass(slots=True)
class Response:
    """A complete response. `body` is sent as is with Content-Length.

    Do not change a Response once it has been handed to the server: one object may be sent on
    many connections (a long-poll fan-out), and the server keeps its rendered bytes with it.
    """

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # ask the server to close the connection after sending
    # The server's memo of the bytes on the wire, see `wire.render_shared` (loop thread only).
    _wire: tuple[bytes, dict[bytes, bytes]] | None = field(
        default=None, init=False, repr=False, compare=False)


class Headers(dict):
    """A request's headers when at least one value is not valid UTF-8.

    Such a value is kept with its bytes escaped (`surrogateescape`), and reading it with
    `get` or `[]` raises HTTPError 400 `invalid_header` naming the header: an application
    never takes those bytes for text (nor stores or echoes them). A header it does not read
    may hold anything, and `in` still tells whether one was sent.
    """

    __slots__ = ()

    def __getitem__(self, name: str) -> str:
        return _utf8_only(name, dict.__getitem__(self, name))

    def get(self, name: str, default: Any = None) -> Any:
        value = dict.get(self, name, _ABSENT)
        return default if value is _ABSENT else _utf8_only(name, value)


_ABSENT = object()


def _utf8_only(name: str, value: str) -> str:
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPError(400, "invalid_header", f"the {name} header is not valid UTF-8",
                        extra={"header": name}) from None
    return value


def json_response(status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, dumps(obj), "application/json", tuple(headers))


class HTTPError(Exception):
    """Raise anywhere in a handler: becomes `{"error": code, "message": message}`."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Iterable[tuple[str, str]] = (), extra: dict[str, Any] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = tuple(headers)
        self.extra = extra or {}
        self.close = close

    def to_response(self) -> Response:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        body.update(self.extra)
        return Response(self.status, dumps(body), "application/json", self.headers, self.close)


class LoopHandle(Protocol):
    """What the server's selector loop offers to other layers (the realtime hub)."""

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None: ...
    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Any: ...
    def in_loop_thread(self) -> bool: ...


class Deferred:
    """A response that comes later: a parked request, costing no thread while it waits.

    A handler returns one; the server attaches it to the connection on the loop thread and
    starts its timer. Exactly one of these happens, once, on the loop thread:
      - `resolve(response)` (from any thread) sends that response;
      - the timeout passes: `on_timeout()` is called and what it returns is sent;
      - the client goes away or the server shuts down: `on_cancel()` is called.
    A `resolve` that arrives before the server attached the deferred is kept and sent at attach.

    `working=True` marks a request whose answer is being computed elsewhere (a write queued
    for commit, a password being hashed) rather than one waiting for something to happen: a
    graceful shutdown lets it finish within the grace period instead of answering 503 at once,
    since its work may already have taken effect.

    Once one of them has happened the deferred drops its callbacks (`on_timeout`, `on_cancel`
    and the server's sender become None): they usually lead back to the objects that hold the
    deferred (a hub's waiter, a connection), and without those cycles a finished long-poll is
    freed by reference counting at once. Left to the cyclic garbage collector, such leftovers
    pile up into full collections that scan every parked request and hold the GIL meanwhile.
    """

    __slots__ = ("timeout", "on_timeout", "on_cancel", "working", "_lock", "_done", "_early",
                 "_sender", "_loop")

    def __init__(self, timeout: float, on_timeout: Callable[[], Response],
                 on_cancel: Callable[[], None] | None = None, *, working: bool = False) -> None:
        self.timeout = timeout
        self.on_timeout: Callable[[], Response] | None = on_timeout
        self.on_cancel = on_cancel
        self.working = working
        self._lock = threading.Lock()
        self._done = False
        self._early: Response | None = None
        self._sender: Callable[[Response], None] | None = None
        self._loop: LoopHandle | None = None

    @property
    def done(self) -> bool:
        return self._done

    def resolve(self, response: Response) -> bool:
        """Answer the parked request. Returns False if it was already answered or cancelled."""
        with self._lock:
            if self._done:
                return False
            sender, loop = self._sender, self._loop
            if sender is None:
                if self._early is not None:
                    return False
                self._early = response
                return True
            self._done = True
            self._release()
        if loop is None or loop.in_loop_thread():
            sender(response)
        else:
            loop.call_soon_threadsafe(sender, response)
        return True

    # -- called by the server only, on the loop thread --------------------------------
    def _attach(self, loop: LoopHandle, sender: Callable[[Response], None]) -> Response | None:
        """Bind to a connection. Returns a response to send at once if one came early."""
        with self._lock:
            self._loop = loop
            early = self._early
            if early is not None:
                self._done = True
                self._release()
            else:
                self._sender = sender
            return early

    def _expire(self) -> Response | None:
        """Time out: what `on_timeout()` returns, or None if answered or cancelled before."""
        return self._time_out()[1]

    def _time_out(self) -> tuple[bool, Response | None]:
        """Time out: (True, what `on_timeout()` returns), or (False, None) if the deferred was
        answered or cancelled before (a resolve from another thread is then on its way)."""
        with self._lock:
            if self._done:
                return False, None
            self._done = True
            on_timeout = self.on_timeout
            self._release()
        return True, on_timeout()

    def _cancel(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            on_cancel = self.on_cancel
            self._release()
        if on_cancel is not None:
            on_cancel()

    def _release(self) -> None:
        """Done (under the lock): drop the callbacks, see the class docstring."""
        self.on_timeout = self.on_cancel = self._sender = None


class Handler(Protocol):
    """A route's handler. `blocking` handlers run on a worker thread; others on the loop."""

    blocking: bool

    def __call__(self, request: Request) -> Response | Deferred: ...


class Application(Protocol):
    def resolve(self, request: Request) -> Handler:
        """Called on the loop thread; must be cheap. Raises HTTPError (404, 405...)."""
        ...
