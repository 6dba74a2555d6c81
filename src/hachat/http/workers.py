"""A small pool of threads for handlers that block (database work).

The pool never touches sockets: a task hands its result back to the loop with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

log = logging.getLogger("hachat.http")


class WorkerPool:
    def __init__(self, size: int, name: str = "hachat-http-worker") -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = size
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple] | None] = (
            queue.SimpleQueue())
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        with self._lock:
            if self._threads or self._stopped:
                return
            for i in range(self.size):
                t = threading.Thread(target=self._run, name=f"{self.name}-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._queue.put((fn, args))

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:
                log.exception("uncaught error in worker task %r", fn)

    def stop(self, timeout: float | None = None) -> bool:
        """Let queued tasks finish, then end the threads. Returns True if all ended in time."""
        with self._lock:
            if self._stopped:
                threads = []
            else:
                self._stopped = True
                threads = list(self._threads)
                for _ in threads:
                    self._queue.put(None)
        deadline = None if timeout is None else monotonic() + timeout
        current = threading.current_thread()
        for t in threads:
            if t is current:
                continue
            t.join(None if deadline is None else max(0.0, deadline - monotonic()))
        return not any(t.is_alive() for t in threads if t is not current)

    def owns_current_thread(self) -> bool:
        return threading.current_thread() in self._threads
