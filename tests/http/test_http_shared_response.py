"""One Response answering many parked requests (a long-poll fan-out): its bytes are rendered
once per distinct Connection line, each connection still gets the head that fits it, and a
connection that cannot take the whole answer at once gets the rest later."""

from __future__ import annotations

import socket
import threading

from http_testkit import Client, wait_for

from hachat.http.messages import Response
from hachat.http.wire import CONN_CLOSE, CONN_KEEP_ALIVE, render, render_shared


def parked(server, n: int) -> bool:
    return wait_for(lambda: server.stats()["parked"] == n)


def resolve_on_loop(server, deferreds, response: Response) -> None:
    """Answer `deferreds` on the loop thread, one after another, as the hub's fan-out does."""
    done = threading.Event()

    def fan_out() -> None:
        for d in deferreds:
            d.resolve(response)
        done.set()

    server.loop.call_soon_threadsafe(fan_out)
    assert done.wait(5)


def test_render_shared_renders_once_per_connection_line_and_date():
    resp = Response(200, b'{"n":1}\n', headers=(("X-Shared", "yes"),))
    date1 = b"Date: Thu, 03 Dec 2026 20:00:00 GMT\r\n"
    date2 = b"Date: Thu, 03 Dec 2026 20:00:01 GMT\r\n"
    plain = render_shared(resp, b"", date1)
    assert plain == render(resp, False, b"", date1)
    assert render_shared(resp, b"", date1) is plain  # the same bytes object, not a copy
    close = render_shared(resp, CONN_CLOSE, date1)
    assert close == render(resp, False, CONN_CLOSE, date1) and close is not plain
    assert render_shared(resp, CONN_CLOSE, date1) is close
    assert render_shared(resp, b"", bytes(bytearray(date1))) is not plain  # by identity
    later = render_shared(resp, b"", date2)  # the next second: rendered again
    assert later == render(resp, False, b"", date2) and date2 in later
    assert render_shared(resp, CONN_KEEP_ALIVE, date2) == render(resp, False, CONN_KEEP_ALIVE,
                                                                 date2)


def test_one_response_to_connections_of_every_kind(server, app):
    kinds = {  # name -> (request line and headers, what the connection does afterwards)
        "1.1": ("GET /park HTTP/1.1\r\nHost: t\r\n", "keep-alive"),
        "1.1 again": ("GET /park HTTP/1.1\r\nHost: t\r\n", "keep-alive"),
        "1.1 close": ("GET /park HTTP/1.1\r\nHost: t\r\nConnection: close\r\n", "close"),
        "1.0 keep-alive": ("GET /park HTTP/1.0\r\nConnection: keep-alive\r\n", "keep-alive"),
        "1.0": ("GET /park HTTP/1.0\r\n", "close"),
        "HEAD": ("HEAD /park HTTP/1.1\r\nHost: t\r\n", "keep-alive"),
    }
    clients = {}
    try:
        for i, (name, (head, _)) in enumerate(kinds.items()):
            c = Client(server.address)
            c.send(head.encode() + b"\r\n")
            clients[name] = c
            assert parked(server, i + 1)  # parked in this order: app.parked[i] is `name`
        body = b'{"events":[{"id":7}],"cursor":7}\n'
        shared = Response(200, body, headers=(("X-Shared", "yes"),))
        resolve_on_loop(server, app.parked, shared)
        for name, (_, after) in kinds.items():
            c = clients[name]
            reply = c.read_response(head=name == "HEAD")
            assert reply.status == 200, name
            assert reply.headers["content-type"] == "application/json"
            assert reply.headers["content-length"] == str(len(body)), name
            assert reply.headers["x-shared"] == "yes"
            assert "date" in reply.headers
            assert reply.body == (b"" if name == "HEAD" else body), name
            if after == "close":
                assert reply.headers["connection"] == "close", name
                assert c.wait_closed(), name
            else:
                expected = "keep-alive" if name.startswith("1.0") else None
                assert reply.headers.get("connection") == expected, name
                if name.startswith("1.0"):
                    c.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                    assert c.read_response().status == 200
                else:
                    assert c.request("/health").status == 200, name  # the connection goes on
        # Rendered once per distinct Connection line (none, close, keep-alive); the HEAD
        # answer is rendered on its own, without the body.
        assert shared._wire is not None
        assert set(shared._wire[1]) == {b"", CONN_CLOSE, CONN_KEEP_ALIVE}
        assert server.stats()["parked"] == 0
    finally:
        for c in clients.values():
            c.close()


def test_a_waiter_with_a_full_socket_buffer_gets_the_rest_later(server, app):
    body = b"[" + b"7," * 1_500_000 + b"7]\n"  # 3 MB: far more than a socket buffer takes
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(server.address)
    slow.sendall(b"GET /park HTTP/1.1\r\nHost: t\r\n\r\n")
    assert parked(server, 1)
    fast = Client(server.address)
    fast.send(b"GET /park HTTP/1.1\r\nHost: t\r\n\r\n")
    assert parked(server, 2)
    shared = Response(200, body)
    try:
        resolve_on_loop(server, app.parked, shared)  # `slow` reads nothing yet
        # its answer did not fit: the rest waits in the connection's write buffer
        assert any(c._out for c in list(server._conns.values()))
        # The other waiter gets the whole answer while the slow one's is still queued.
        fast.sock.settimeout(10)
        reply = fast.read_response()
        assert reply.status == 200 and reply.body == body
        assert fast.request("/health").status == 200
        assert server.stats()["parked"] == 0
        # Now the slow client reads: the rest of its answer follows, byte for byte.
        with Client.__new__(Client) as late:
            late.sock, late.buf = slow, b""
            slow.settimeout(10)
            reply = late.read_response()
            assert reply.status == 200 and reply.body == body
            assert late.request("/health").status == 200  # and the connection goes on
        # Sending part of the shared bytes and buffering the rest left them intact.
        data = shared._wire[1][b""]
        assert data.endswith(body) and data.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        fast.close()
        slow.close()


def test_parked_requests_take_no_timer_each(server, app):
    n = 200
    timers_before = server.stats()["timers"]
    clients = [Client(server.address) for _ in range(n)]
    try:
        for c in clients:
            c.get("/park?30")
        assert parked(server, n)
        # Each connection's own deadline (one heap entry each) times its wait: parking adds
        # nothing to the timer heap (a call_later per park would make that 2 n entries).
        assert server.stats()["timers"] - timers_before <= n
        resolve_on_loop(server, app.parked, Response(200, b"{}"))
        assert all(c.read_response().body == b"{}" for c in clients)
    finally:
        for c in clients:
            c.close()
