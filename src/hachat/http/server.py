"""`HTTPServer`: one selector loop thread owns every socket; a small pool runs blocking handlers.

    server = HTTPServer(app, settings.http)
    host, port = server.bind()
    install_signal_handlers(server)     # SIGTERM / SIGINT -> graceful shutdown, exit 0
    server.serve_forever()              # this thread becomes the loop

`app.resolve(request)` runs on the loop. A handler whose `blocking` attribute is true runs on a
worker thread; any other runs inline on the loop (keep those short: /health). Idle keep-alive
connections and parked long-polls cost no thread.

Each connection is a file descriptor. `bind` fits the connection limit to the process's
open-file limit (`fit_open_files`); past the limit, new connections wait in the kernel's
backlog until one closes. One address may hold at most `max_connections_per_address` of them
(loopback, a proxy on this machine, is not counted): past it a new connection gets a 503 and is
closed, so one client cannot take every slot. Should accept() still run out of descriptors
(EMFILE: the database or anything else took more than the reserve), accepting pauses with a
growing back-off and resumes as soon as a connection closes; the connections already open are
served meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from hachat.http.addresses import client_key, is_loopback
from hachat.http.connection import Connection
from hachat.http.loop import EV_READ, EventLoop
from hachat.http.messages import Application, HTTPError
from hachat.http.wire import CONN_CLOSE, date_line, render
from hachat.http.workers import WorkerPool
from hachat.settings import HTTPSettings

log = logging.getLogger("hachat.http")

ACCEPT_BATCH = 128  # connections accepted per readiness event at most
RECV_BUFFER = 64 * 1024
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_MIN = 0.05  # seconds: the first pause after accept() ran out of resources
ACCEPT_BACKOFF_MAX = 1.0  # ... doubling up to this


def fit_open_files(max_connections: int, reserve: int) -> int:
    """How many connections the open-file limit (RLIMIT_NOFILE) allows, at most
    `max_connections`; raises the soft limit toward the hard one first if that is needed.

    `reserve` descriptors are left for everything else (listener, poller, database
    connections, log files); at most half of a very low limit goes to them. Logs one line
    when it raised the limit or has to cap: INFO when MAX_CONNECTIONS is the default (it means
    "as many as the machine allows, up to 20,000"), WARNING when a MAX_CONNECTIONS set by the
    operator cannot be met or little is left for the reserve.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on this platform
        return max_connections
    infinity = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + reserve
    raised_from = None
    if soft != infinity and soft < wanted:
        target = wanted if hard == infinity else min(wanted, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                raised_from, soft = soft, target
            except (ValueError, OSError) as exc:  # e.g. macOS caps it below the hard limit
                log.debug("cannot raise the open-file limit to %d: %s", target, exc)
    if soft == infinity:
        return max_connections
    squeezed = soft - reserve < soft // 2
    limit = min(max_connections, soft // 2 if squeezed else soft - reserve)
    raised = f" (raised from {raised_from})" if raised_from is not None else ""
    if limit < max_connections:
        operator_set = max_connections != HTTPSettings.max_connections
        level = logging.WARNING if operator_set or squeezed else logging.INFO
        log.log(level, "at most %d connections at once: the open-file limit is %d%s "
                "(hard limit %s), less %d kept for other files; MAX_CONNECTIONS is %d",
                limit, soft, raised, "unlimited" if hard == infinity else hard,
                soft - limit, max_connections)
    elif raised_from is not None:
        log.info("open-file limit raised from %d to %d for MAX_CONNECTIONS=%d and %d other "
                 "files", raised_from, soft, max_connections, reserve)
    return limit


class HTTPServer:
    """See the module docstring. Thread-safe: `shutdown`, `stats`, `loop.call_soon_threadsafe`."""

    def __init__(self, app: Application, settings: HTTPSettings | None = None) -> None:
        self._app = app
        self.settings = settings = settings or HTTPSettings()
        self._loop = EventLoop()
        self._pool = WorkerPool(settings.workers)
        self._conns: dict[int, Connection] = {}
        self._listener: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._date = date_line()
        # counters (written on the loop thread only)
        self._parked = 0
        self._served = 0
        self._in_flight = 0
        self._queued_bytes = 0  # bytes of requests parsed ahead, not yet handled (all conns)
        self._per_address: dict[str, int] = {}  # open connections per counted peer address
        self._refused = 0  # connections refused for their address's limit
        self._accepted = 0
        # lifecycle
        self._lock = threading.RLock()
        self._serving = False
        self._shutdown_requested = False
        self._closing = False  # on the loop: shutdown has begun
        self._grace_deadline = 0.0
        self._accepting = True
        self._at_capacity = False
        self._max_conns = settings.max_connections  # fitted to the open-file limit at bind
        self._accept_backoff = 0.0  # > 0 while accept() keeps running out of descriptors
        self._accept_failures = 0
        self._accept_timer: Any = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._exit_code: int | None = None

    # -- public API --------------------------------------------------------------------------
    @property
    def loop(self) -> EventLoop:
        """The `LoopHandle`: usable before `serve_forever` (calls queue up) and from any thread."""
        return self._loop

    def bind(self) -> tuple[str, int]:
        """Bind and listen on settings.host / settings.port (0: a free port)."""
        with self._lock:
            if self._listener is not None:
                return self.address
            if self._shutdown_requested:
                raise RuntimeError("the server was shut down")
            self._max_conns = fit_open_files(self.settings.max_connections,
                                             self.settings.fd_reserve)
            sock = _listen(self.settings.host, self.settings.port, self.settings.backlog)
            self._listener = sock
            self.address = tuple(sock.getsockname()[:2])
            return self.address

    def serve_forever(self) -> None:
        """Run the loop in the calling thread until `shutdown`."""
        with self._lock:
            if self._shutdown_requested:
                return
            if self._serving:
                raise RuntimeError("serve_forever is already running")
            self.bind()
            self._serving = True
        self._pool.start()
        try:
            self._loop.run(on_started=self._on_loop_started)
        finally:
            self._teardown()
        if self._exit_code is not None:
            raise SystemExit(self._exit_code)

    def start_background(self) -> threading.Thread:
        """Bind if needed and serve in a daemon thread; returns once accepting."""
        if self._thread is not None:
            return self._thread
        self.bind()
        thread = threading.Thread(target=self._serve_quietly, name="hachat-http-loop",
                                  daemon=True)
        self._thread = thread
        thread.start()
        while not self._started.wait(0.05):
            if not thread.is_alive():
                raise RuntimeError("the HTTP server thread failed to start")
        return thread

    def shutdown(self, grace: float | None = None) -> None:
        """Graceful stop, from any thread: stop accepting, answer parked requests 503, let
        in-flight requests finish (up to `grace` seconds, default settings.shutdown_grace),
        close the rest, stop the loop and the workers. Blocks until done unless called from
        the loop thread or a worker thread (then it only starts the shutdown)."""
        if grace is None:
            grace = self.settings.shutdown_grace
        with self._lock:
            self._shutdown_requested = True
            serving = self._serving
        if not serving:
            self._close_listener()
            self._pool.stop(timeout=grace)
            self._loop.close()
            self._stopped.set()
            return
        if self._loop.in_loop_thread():
            self._begin_shutdown(grace)
            return
        self._loop.call_soon_threadsafe(self._begin_shutdown, grace)
        if self._pool.owns_current_thread():
            return
        self._stopped.wait(grace + 10.0)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def stats(self) -> dict[str, Any]:
        """Counts for tests and benchmarks (leak checks)."""
        return {
            "connections": len(self._conns),
            "max_connections": self._max_conns,
            "parked": self._parked,
            "requests": self._served,
            "in_flight": self._in_flight,
            "refused": self._refused,
            "queued_bytes": self._queued_bytes,
            "accepted": self._accepted,
            "timers": self._loop.pending_timers(),
            "closing": self._closing,
            "stopped": self._stopped.is_set(),
        }

    def request_exit(self, code: int = 0, grace: float | None = None) -> None:
        """Begin a graceful shutdown without blocking; `serve_forever` then raises
        SystemExit(code) once the loop has stopped (used by the signal handlers)."""
        self._exit_code = code
        with self._lock:
            self._shutdown_requested = True
        if grace is None:
            grace = self.settings.shutdown_grace
        self._loop.call_soon_threadsafe(self._begin_shutdown, grace)
        self._loop.wakeup()  # from a signal handler on the loop thread, poll must return

    # -- loop side ---------------------------------------------------------------------------
    def _serve_quietly(self) -> None:
        try:
            self.serve_forever()
        except SystemExit:
            pass
        except Exception:
            log.exception("the HTTP server loop failed")

    def _on_loop_started(self) -> None:
        listener = self._listener
        if listener is not None:
            self._loop.register(listener.fileno(), EV_READ, self._on_accept)
        self._tick_date()
        self._started.set()

    def _tick_date(self) -> None:
        self._date = date_line()
        now = time.time()
        self._loop.call_later(1.0 - (now % 1.0) + 0.001, self._tick_date)

    def _on_accept(self, events: int) -> None:
        listener = self._listener
        if listener is None or not self._accepting:
            return
        conns = self._conns
        loop = self._loop
        header_deadline = loop.time() + self.settings.header_timeout
        cap = self._max_conns
        per_address = self.settings.max_connections_per_address
        for _ in range(ACCEPT_BATCH):
            if len(conns) >= cap:
                # Full: leave the rest in the kernel's backlog until a connection closes.
                self._at_capacity = True
                self._accepting = False
                loop.modify(listener.fileno(), 0)
                return
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                    self._accept_failed(exc)
                    return
                continue  # ECONNABORTED and friends: that client is gone
            if self._accept_backoff:
                log.info("accepting connections again (%d accepts had failed)",
                         self._accept_failures)
                self._accept_backoff = 0.0
                self._accept_failures = 0
            try:
                sock.setblocking(False)
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = Connection(self, sock, addr)
                conns[conn.fd] = conn
                loop.register(conn.fd, EV_READ, conn.on_event, conn._close)
            except OSError:
                log.exception("could not set up an accepted connection")
                sock.close()
                continue
            self._accepted += 1
            conn._set_deadline(header_deadline)
            if per_address and not self._admit(conn, addr, per_address):
                conn._close()

    def _accept_failed(self, exc: OSError) -> None:
        """accept() ran out of descriptors or memory: the client stays in the backlog. Pause
        accepting (the listener stays readable: retrying at once would spin), doubling the
        pause while it lasts; a closing connection frees a descriptor and resumes it early.
        One warning per episode, one line when it is over."""
        if self._accept_backoff:
            self._accept_backoff = min(2 * self._accept_backoff, ACCEPT_BACKOFF_MAX)
        else:
            self._accept_backoff = ACCEPT_BACKOFF_MIN
            log.warning("accept failed (%s) with %d connections open; pausing new "
                        "connections and retrying with a back-off of up to %g s",
                        exc, len(self._conns), ACCEPT_BACKOFF_MAX)
        self._accept_failures += 1
        listener = self._listener
        if listener is None:
            return
        self._accepting = False
        self._loop.modify(listener.fileno(), 0)
        self._accept_timer = self._loop.call_later(self._accept_backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        timer, self._accept_timer = self._accept_timer, None
        if timer is not None:
            timer.cancel()
        listener = self._listener
        if listener is None or self._closing or self._accepting:
            return
        if len(self._conns) >= self._max_conns:
            self._at_capacity = True  # `_forget` resumes when a connection closes
            return
        self._at_capacity = False
        self._accepting = True
        self._loop.modify(listener.fileno(), EV_READ)

    def _admit(self, conn: Connection, addr: Any, limit: int) -> bool:
        """Count `conn` against its peer address (IPv6: its /64): False (after a 503 to it)
        when that address already holds `limit` connections. Loopback peers are not
        counted."""
        host = addr[0] if isinstance(addr, tuple) and addr else None
        if host is None or is_loopback(host):
            return True
        host = client_key(host)  # an IPv6 client by its /64
        held = self._per_address.get(host, 0)
        if held >= limit:
            self._refused += 1
            response = HTTPError(503, "too_many_connections",
                                 f"this address has {held} connections open, the most "
                                 "allowed; close one or retry later",
                                 headers=(("Retry-After", "1"),), close=True).to_response()
            with contextlib.suppress(OSError):
                conn._sock.send(render(response, False, CONN_CLOSE, self._date))
            return False
        self._per_address[host] = held + 1
        conn.peer_host = host
        return True

    def _forget(self, conn: Connection) -> None:
        self._conns.pop(conn.fd, None)
        host = conn.peer_host
        if host is not None:
            conn.peer_host = None
            held = self._per_address.pop(host, 1) - 1
            if held > 0:
                self._per_address[host] = held
        if (self._at_capacity or self._accept_timer is not None) and (
                len(self._conns) < self._max_conns):
            self._resume_accepting()  # a descriptor and a slot are free

    def _close_listener(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            if not self._loop.closed:
                self._loop.unregister(listener.fileno())
            listener.close()

    def _begin_shutdown(self, grace: float) -> None:
        if self._closing:
            return
        self._closing = True
        self._grace_deadline = time.monotonic() + max(0.0, grace)
        self._close_listener()
        for conn in list(self._conns.values()):
            try:
                conn.begin_shutdown()
            except Exception:
                log.exception("error shutting down %r", conn)
                conn._close()
        self._check_drained()

    def _check_drained(self) -> None:
        busy = self._in_flight > 0 or any(c.busy() for c in list(self._conns.values()))
        if not busy or time.monotonic() >= self._grace_deadline:
            self._loop.stop()
        else:
            self._loop.call_later(0.01, self._check_drained)

    def _teardown(self) -> None:
        """On the loop thread after the loop returned: close everything, stop the workers."""
        try:
            for conn in list(self._conns.values()):
                conn._close()
            self._close_listener()
            remaining = max(0.05, self._grace_deadline - time.monotonic())
            if not self._pool.stop(timeout=remaining):
                log.warning("worker threads still busy after the shutdown grace period")
        finally:
            self._loop.close()
            self._stopped.set()


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    if host in ("", "0.0.0.0"):
        family, addr = socket.AF_INET, ("0.0.0.0", port)
    elif ":" in host:
        family, addr = socket.AF_INET6, (host, port)
    else:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)[0]
        family, addr = info[0], info[4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def install_signal_handlers(server: HTTPServer, *, grace: float | None = None,
                            signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """SIGTERM / SIGINT -> graceful `shutdown`, then the process exits with status 0.

    Call from the main thread. If the main thread runs `serve_forever`, the shutdown is
    started without blocking and `serve_forever` raises SystemExit(0) when the loop is done
    (so `finally:` blocks still run). Otherwise (the loop is in `start_background`'s thread)
    the handler blocks in `shutdown` and then raises SystemExit(0) in the main thread.
    A second signal while shutting down exits at once with status 1.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_signal_handlers must be called from the main thread")
    seen = []

    def handle(signum: int, frame: Any) -> None:
        if seen:
            log.warning("second signal %d during shutdown: exiting now", signum)
            os._exit(1)
        seen.append(signum)
        log.info("signal %d: shutting down", signum)
        if server.loop.in_loop_thread():
            server.request_exit(0, grace)
            return
        server.shutdown(grace)
        raise SystemExit(0)

    for sig in signals:
        signal.signal(sig, handle)
