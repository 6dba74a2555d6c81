"""A TCP relay for fault-injection tests: it forwards connections to a local port and lets a
subclass decide, per connection, what passes and when the connection is dropped."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator


class TappedRelay:
    """Listens on a free local port and relays each connection to 127.0.0.1:`target_port`
    through `relay(client, upstream)`, which subclasses write; both sockets are closed when it
    returns. `eaten` is for a subclass that drops something once."""

    upstream_timeout = 2.0

    def __init__(self, target_port: int, backlog: int = 64) -> None:
        self.target = ("127.0.0.1", target_port)
        self.eaten = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(backlog)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        raise NotImplementedError

    @staticmethod
    def chunks(client: socket.socket, upstream: socket.socket,
               idle: float = 30.0) -> Iterator[tuple[socket.socket, bytes]]:
        """(the socket it came from, the bytes) as they arrive; ends when either side closes
        or nothing arrives for `idle` seconds."""
        while True:
            ready, _, _ = select.select([client, upstream], [], [], idle)
            if not ready:
                return
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                yield s, data

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=self.upstream_timeout)
        except OSError:
            client.close()
            return
        try:
            self.relay(client, upstream)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()
