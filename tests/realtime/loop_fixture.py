"""A tiny real event loop implementing `hachat.http.messages.LoopHandle`, for realtime tests.

One thread runs FIFO callbacks and a timer heap, as the socket server's selector loop does.
`Parked` plays the server's part for a Deferred: attach on the loop thread, send an early
resolution at once, else start the timer; `cancel()` is the client going away.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from hachat.http.messages import Deferred, Response, json_response


class TimerHandle:
    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when: float, fn: Callable[..., Any], args: tuple) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class RealLoop:
    """call_soon_threadsafe / call_later / in_loop_thread on a dedicated thread."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._ready: deque[tuple[Callable[..., Any], tuple]] = deque()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._ident: int | None = None
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="test-loop", daemon=True)

    def start(self) -> RealLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "test loop did not stop"

    # -- LoopHandle ------------------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._cv:
            self._ready.append((fn, args))
            self._cv.notify()

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + delay, fn, args)
        with self._cv:
            heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
            self._cv.notify()
        return handle

    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self._ident

    # -- helpers -----------------------------------------------------------------------
    def run_sync(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """Run fn(*args) on the loop thread and return its result."""
        if self.in_loop_thread():
            return fn(*args)
        done = threading.Event()
        box: list[Any] = []

        def call() -> None:
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:  # handed back to the caller
                box.append((False, exc))
            finally:
                done.set()

        self.call_soon_threadsafe(call)
        assert done.wait(timeout), "loop did not run the callback in time"
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every callback queued before this call has run."""
        self.run_sync(lambda: None, timeout=timeout)

    def _run(self) -> None:
        self._ident = threading.get_ident()
        cv = self._cv
        while True:
            with cv:
                while True:
                    now = time.monotonic()
                    timers = self._timers
                    while timers and timers[0][0] <= now:
                        handle = heapq.heappop(timers)[2]
                        if not handle.cancelled:
                            self._ready.append((handle.fn, handle.args))
                    if self._ready:
                        batch = list(self._ready)
                        self._ready.clear()
                        break
                    if self._stopping:
                        return
                    cv.wait(timers[0][0] - now if timers else None)
            for fn, args in batch:
                try:
                    fn(*args)
                except Exception:
                    self.errors.append(traceback.format_exc())


class Parked:
    """The server's side of one parked request: attach, timer, send, cancel."""

    def __init__(self, loop: RealLoop, deferred: Deferred, attach: bool = True) -> None:
        self.loop = loop
        self.deferred = deferred
        self.responses: list[Response] = []
        self.sent = threading.Event()
        self.timer: TimerHandle | None = None
        if attach:
            loop.run_sync(self._attach)

    def _send(self, response: Response) -> None:
        assert self.loop.in_loop_thread(), "a response was sent off the loop thread"
        self.responses.append(response)
        if self.timer is not None:
            self.timer.cancel()
        self.sent.set()

    def _attach(self) -> None:
        early = self.deferred._attach(self.loop, self._send)
        if early is not None:
            self._send(early)
        else:
            self.timer = self.loop.call_later(self.deferred.timeout, self._expire)

    def _expire(self) -> None:
        response = self.deferred._expire()
        if response is not None:
            self._send(response)

    def cancel(self) -> None:
        """The client went away."""

        def do() -> None:
            if self.timer is not None:
                self.timer.cancel()
            self.deferred._cancel()

        self.loop.run_sync(do)

    def response(self, timeout: float = 10.0) -> Response:
        assert self.sent.wait(timeout), "no response in time"
        assert len(self.responses) == 1, self.responses
        return self.responses[0]


class FakeLoop:
    """A LoopHandle that queues callbacks for the test to run by hand, on the calling thread
    (which counts as the loop thread). For deterministic tests and the fan-out benchmark."""

    def __init__(self) -> None:
        self.queue: deque[tuple[Callable[..., Any], tuple]] = deque()
        self.timers: list[tuple[float, Callable[..., Any], tuple]] = []

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        self.queue.append((fn, args))

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        handle = TimerHandle(delay, fn, args)
        self.timers.append((delay, fn, args))
        return handle

    def in_loop_thread(self) -> bool:
        return True

    def run_pending(self) -> int:
        n = 0
        while self.queue:
            fn, args = self.queue.popleft()
            fn(*args)
            n += 1
        return n


def attach_many(loop: RealLoop, deferreds: list[Deferred]) -> list[Parked]:
    """Attach many deferreds in one loop callback (as a server does for many connections)."""
    parked = [Parked(loop, d, attach=False) for d in deferreds]

    def do() -> None:
        for p in parked:
            p._attach()

    loop.run_sync(do, timeout=60)
    return parked


class CountingRender:
    """An events renderer (`render(events, cursor)`) that counts its calls. Thread-safe."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, events: list, cursor: int) -> Response:
        with self._lock:
            self.calls += 1
        return json_response(200, {"events": [e.to_json_obj() for e in events],
                                   "cursor": cursor})


def body(response: Response) -> Any:
    return json.loads(response.body)
