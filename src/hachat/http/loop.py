"""The selector loop: one thread owns every socket, a timer heap and a queue of callbacks.

`EventLoop` implements `messages.LoopHandle`. Other threads talk to it only through
`call_soon_threadsafe`, which appends to a deque and writes a wakeup fd (an eventfd when the
platform has one, else a socket pair) at most once per loop turn.

Timers live in one heap of `(when, seq, entry)`. An entry is either a `TimerHandle`
(`call_later`; cancelling only marks it, the heap is compacted when cancelled entries pile up)
or an object with a moving deadline (a connection): it is pushed only when its deadline moves
*earlier* than the entry already in the heap, and re-pushed when a stale entry pops. That
keeps the per-request cost of "reset the keep-alive timer" to one attribute write.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import select
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable
from itertools import count
from time import monotonic
from typing import Any

log = logging.getLogger("hachat.http")

# Event bits, epoll's values (the selectors fallback maps onto them).
EV_READ = getattr(select, "EPOLLIN", 0x001)
EV_WRITE = getattr(select, "EPOLLOUT", 0x004)
EV_ERR = getattr(select, "EPOLLERR", 0x008)
EV_HUP = getattr(select, "EPOLLHUP", 0x010)

USE_EPOLL = hasattr(select, "epoll")
_COMPACT_MIN = 1024  # compact the heap when this many entries are dead and they are half of it


class TimerHandle:
    """What `call_later` returns: `cancel()` it from any thread."""

    __slots__ = ("when", "_fn", "_args", "_loop", "cancelled")

    def __init__(self, when: float, fn: Callable[..., Any], args: tuple, loop: EventLoop) -> None:
        self.when = when
        self._fn = fn
        self._args = args
        self._loop = loop
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._fn = self._args = None
            loop = self._loop
            if loop is not None:
                self._loop = None
                loop._dead_timers += 1

    # -- heap entry protocol ---------------------------------------------------------------
    def _timer_fire(self, when: float) -> bool:
        """Run the callback; True if this entry was dead (cancelled) instead."""
        if self.cancelled:
            return True
        fn, args = self._fn, self._args
        self._fn = self._args = self._loop = None
        self.cancelled = True  # a fired timer cannot fire again; cancel() becomes a no-op
        fn(*args)
        return False

    def _timer_dead(self, when: float) -> bool:
        return self.cancelled


class _EpollPoller:
    __slots__ = ("_ep", "register", "modify", "unregister", "poll", "close")

    def __init__(self) -> None:
        self._ep = ep = select.epoll()
        self.register = ep.register
        self.modify = ep.modify
        self.unregister = ep.unregister
        self.poll = ep.poll
        self.close = ep.close


class _SelectorPoller:
    """Fallback for platforms without epoll: the same interface over `selectors`.
    A descriptor with an empty mask is taken out of the selector (no spinning on it)."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._masks: dict[int, int] = {}

    @staticmethod
    def _to_sel(mask: int) -> int:
        m = 0
        if mask & EV_READ:
            m |= selectors.EVENT_READ
        if mask & EV_WRITE:
            m |= selectors.EVENT_WRITE
        return m

    def register(self, fd: int, mask: int) -> None:
        if fd in self._masks:
            raise FileExistsError(fd)
        self._masks[fd] = 0
        self.modify(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        old = self._masks[fd]
        new = self._to_sel(mask)
        if old and new:
            self._sel.modify(fd, new)
        elif new:
            self._sel.register(fd, new)
        elif old:
            self._sel.unregister(fd)
        self._masks[fd] = new

    def unregister(self, fd: int) -> None:
        if self._masks.pop(fd):
            self._sel.unregister(fd)

    def poll(self, timeout: float = -1) -> list[tuple[int, int]]:
        out = []
        for key, m in self._sel.select(None if timeout < 0 else timeout):
            ev = 0
            if m & selectors.EVENT_READ:
                ev |= EV_READ
            if m & selectors.EVENT_WRITE:
                ev |= EV_WRITE
            out.append((key.fd, ev))
        return out

    def close(self) -> None:
        self._sel.close()


class _Waker:
    """A file descriptor other threads write to so the loop's poll returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pair: tuple[socket.socket, socket.socket] | None = None
        if hasattr(os, "eventfd"):
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._write = lambda: os.eventfd_write(self.fd, 1)
            self._read = lambda: os.eventfd_read(self.fd)
        else:  # pragma: no cover - non-Linux
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._pair = (r, w)
            self.fd = r.fileno()
            self._write = lambda: w.send(b"\0")
            self._read = lambda: r.recv(4096)
        self.closed = False

    def wake(self) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                self._write()
            except (BlockingIOError, InterruptedError):
                return  # already readable: the loop will wake anyway

    def drain(self) -> None:
        try:
            self._read()
        except (BlockingIOError, InterruptedError):
            return

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._pair is not None:
                for s in self._pair:
                    s.close()
            else:
                os.close(self.fd)


class EventLoop:
    """One thread's poll loop. See the module docstring."""

    def __init__(self) -> None:
        self._poller = _EpollPoller() if USE_EPOLL else _SelectorPoller()
        # epoll reports an error or hang-up on a descriptor even when its mask is empty; the
        # selectors fallback takes such a descriptor out of the selector and sees nothing.
        self.reports_idle_errors = USE_EPOLL
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._error_handlers: dict[int, Callable[[], None]] = {}
        self._ready: deque[tuple[Callable[..., Any], tuple]] = deque()
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = count()
        self._dead_timers = 0
        self._woken = False
        self._waker = _Waker()
        self._thread_id: int | None = None
        self._running = False
        self._stopping = False
        self.closed = False
        self._handlers[self._waker.fd] = self._on_wakeup
        self._poller.register(self._waker.fd, EV_READ)

    # -- LoopHandle --------------------------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the loop thread soon. Safe from any thread, before `run` too."""
        self._ready.append((fn, args))
        if not self._woken and self._thread_id != threading.get_ident():
            self._woken = True
            self._waker.wake()

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run `fn(*args)` on the loop thread after `delay` seconds; returns a cancellable
        handle. Meant for the loop thread; from another thread the push is handed over."""
        return self.call_at(monotonic() + delay, fn, *args)

    def call_at(self, when: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        handle = TimerHandle(when, fn, args, self)
        if self._thread_id == threading.get_ident():
            self._push_entry(when, handle)
        else:
            self.call_soon_threadsafe(self._push_entry, when, handle)
        return handle

    def in_loop_thread(self) -> bool:
        return self._thread_id == threading.get_ident()

    def wakeup(self) -> None:
        """Make a blocked poll return (e.g. from a signal handler running on the loop thread,
        where `call_soon_threadsafe` skips the wakeup write)."""
        self._woken = True
        self._waker.wake()

    # -- for the server (loop thread only) ---------------------------------------------------
    time = staticmethod(monotonic)

    def _push_entry(self, when: float, entry: Any) -> None:
        """Push a heap entry: a TimerHandle or a moving-deadline object (module docstring)."""
        heapq.heappush(self._heap, (when, next(self._seq), entry))
        if self._dead_timers > _COMPACT_MIN and self._dead_timers * 2 > len(self._heap):
            self._compact()

    add_deadline = _push_entry

    def entry_died(self) -> None:
        """A moving-deadline object's entry in the heap became dead (superseded or closed)."""
        self._dead_timers += 1

    def register(self, fd: int, mask: int, callback: Callable[[int], None],
                 on_error: Callable[[], None] | None = None) -> None:
        self._poller.register(fd, mask)
        self._handlers[fd] = callback
        if on_error is not None:
            self._error_handlers[fd] = on_error

    def modify(self, fd: int, mask: int) -> None:
        self._poller.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self._handlers.pop(fd, None)
        self._error_handlers.pop(fd, None)
        with contextlib.suppress(OSError, KeyError, ValueError):
            self._poller.unregister(fd)

    def pending_timers(self) -> int:
        """Live entries in the timer heap (dead ones are removed lazily)."""
        return max(0, len(self._heap) - self._dead_timers)

    def stop(self) -> None:
        """Make `run` return after the current turn (any thread)."""
        self._stopping = True
        self.call_soon_threadsafe(_noop)

    # -- the loop ----------------------------------------------------------------------------
    def _on_wakeup(self, events: int) -> None:
        # Drain first, then clear the flag: a producer that finds it set has written (or is
        # about to write) after our last drain, so its item cannot be missed.
        self._waker.drain()
        self._woken = False

    def run(self, on_started: Callable[[], None] | None = None) -> None:
        if self._running:
            raise RuntimeError("the loop is already running")
        self._running = True
        self._thread_id = threading.get_ident()
        poll = self._poller.poll
        handlers = self._handlers
        errors = self._error_handlers
        ready = self._ready
        heap = self._heap
        heappop = heapq.heappop
        try:
            if on_started is not None:
                on_started()
            while not self._stopping:
                if ready:
                    timeout = 0.0
                elif heap:
                    timeout = heap[0][0] - monotonic()
                    if timeout < 0:
                        timeout = 0.0
                else:
                    timeout = -1
                events = poll(timeout)
                for fd, ev in events:
                    cb = handlers.get(fd)
                    if cb is None:
                        continue
                    try:
                        cb(ev)
                    except Exception:
                        log.exception("error handling events on fd %d", fd)
                        on_error = errors.get(fd)
                        if on_error is not None:
                            try:
                                on_error()
                            except Exception:
                                log.exception("error cleaning up fd %d", fd)
                if heap and heap[0][0] <= monotonic():
                    now = monotonic()
                    while heap and heap[0][0] <= now:
                        when, _, entry = heappop(heap)
                        try:
                            if entry._timer_fire(when):
                                self._dead_timers -= 1
                        except Exception:
                            log.exception("error in timer callback")
                if ready:
                    for _ in range(len(ready)):
                        fn, args = ready.popleft()
                        try:
                            fn(*args)
                        except Exception:
                            log.exception("error in callback %r", fn)
        finally:
            self._running = False
            self._thread_id = None

    def _compact(self) -> None:
        heap = self._heap
        before = len(heap)
        heap[:] = [e for e in heap if not e[2]._timer_dead(e[0])]
        heapq.heapify(heap)
        self._dead_timers = max(0, self._dead_timers - (before - len(heap)))

    def run_ready_now(self) -> None:
        """Run queued callbacks (used after the loop stopped, during teardown)."""
        ready = self._ready
        while ready:
            fn, args = ready.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("error in callback %r", fn)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._waker.close()
        self._poller.close()
        self._handlers.clear()
        self._error_handlers.clear()


def _noop() -> None:
    pass
