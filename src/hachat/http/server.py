"""`HTTPServer`: one selector loop thread owns every socket; a small pool runs blocking handlers.

    server = HTTPServer(app, settings.http)
    host, port = server.bind()
    install_signal_handlers(server)     # SIGTERM / SIGINT -> graceful shutdown, exit 0
    server.serve_forever()              # this thread becomes the loop

`app.resolve(request)` runs on the loop. A handler whose `blocking` attribute is true runs on a
worker thread; any other runs inline on the loop (keep those short: /health). Idle keep-alive
connections and parked long-polls cost no thread.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from hachat.http.connection import Connection
from hachat.http.loop import EV_READ, EventLoop
from hachat.http.messages import Application
from hachat.http.wire import date_line
from hachat.http.workers import WorkerPool
from hachat.settings import HTTPSettings

log = logging.getLogger("hachat.http")

ACCEPT_BATCH = 128  # connections accepted per readiness event at most
RECV_BUFFER = 64 * 1024
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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
        self._accepted = 0
        # lifecycle
        self._lock = threading.RLock()
        self._serving = False
        self._shutdown_requested = False
        self._closing = False  # on the loop: shutdown has begun
        self._grace_deadline = 0.0
        self._accepting = True
        self._at_capacity = False
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
            "parked": self._parked,
            "requests": self._served,
            "in_flight": self._in_flight,
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
        cap = self.settings.max_connections
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
                    log.warning("accept failed (%s); pausing accepts for 0.5 s", exc)
                    self._pause_accepting(0.5)
                    return
                continue  # ECONNABORTED and friends: that client is gone
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

    def _pause_accepting(self, seconds: float) -> None:
        listener = self._listener
        if listener is None:
            return
        self._accepting = False
        self._loop.modify(listener.fileno(), 0)

        def resume() -> None:
            if self._listener is listener and not self._closing:
                self._accepting = True
                self._loop.modify(listener.fileno(), EV_READ)

        self._loop.call_later(seconds, resume)

    def _forget(self, conn: Connection) -> None:
        self._conns.pop(conn.fd, None)
        if self._at_capacity and len(self._conns) < self.settings.max_connections:
            self._at_capacity = False
            listener = self._listener
            if listener is not None and not self._closing:
                self._accepting = True
                self._loop.modify(listener.fileno(), EV_READ)

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
