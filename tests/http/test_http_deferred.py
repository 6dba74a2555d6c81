"""Parked requests (Deferred): resolve from any thread, timeouts, cancels, a 1,000-way fan-out."""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time

import pytest
from http_testkit import App, Client, Route, gated, wait_for

from hachat.http.messages import Deferred, Response


def parked(server, n: int = 1) -> bool:
    return wait_for(lambda: server.stats()["parked"] == n)


@pytest.mark.parametrize("path", ["/park", "/park-worker"])
def test_deferred_resolved_from_another_thread(server, app, client, path):
    client.get(path)
    assert parked(server)
    threading.Thread(target=app.parked[0].resolve,
                     args=(Response(200, b'{"late":true}'),)).start()
    reply = client.read_response()
    assert reply.status == 200 and reply.json == {"late": True}
    assert server.stats()["parked"] == 0
    assert client.request("/health").status == 200  # the connection goes on
    assert app.parked[0].resolve(Response(200, b"{}")) is False  # only once


def test_deferred_timeout_sends_on_timeout_result(server, app, client):
    started = time.monotonic()
    client.get("/park?0.3")
    reply = client.read_response()
    elapsed = time.monotonic() - started
    assert reply.json == {"timeout": True}
    assert 0.3 <= elapsed < 0.8
    assert server.stats()["parked"] == 0
    assert app.cancelled == []


def test_parked_requests_are_exempt_from_connection_timeouts(make_server, app):
    server = make_server(app, header_timeout=0.2, keepalive_timeout=0.2)
    with Client(server.address) as c:
        c.get("/park?0.8")
        reply = c.read_response()
        assert reply.json == {"timeout": True}


def test_resolve_before_the_handler_returns(make_server):
    def early(request):
        d = Deferred(30, lambda: Response(504, b"{}"))
        d.resolve(Response(200, b'{"early":true}'))
        return d

    server = make_server(App({"/early": Route(early), "/early-w": Route(early, True)}))
    with Client(server.address) as c:
        assert c.request("/early").json == {"early": True}
        assert c.request("/early-w").json == {"early": True}
    assert server.stats()["parked"] == 0


def test_client_disconnect_while_parked_cancels(server, app):
    c = Client(server.address)
    c.get("/park")
    assert parked(server)
    c.close()
    assert wait_for(lambda: app.cancelled == app.parked, timeout=2)
    assert wait_for(lambda: server.stats()["parked"] == 0 and server.stats()["connections"] == 0)
    assert app.parked[0].resolve(Response(200, b"{}")) is False
    assert wait_for(lambda: server.stats()["timers"] < 10)


def test_client_reset_while_parked_cancels(server, app):
    c = Client(server.address)
    c.get("/park")
    assert parked(server)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()  # RST
    assert wait_for(lambda: len(app.cancelled) == 1)
    assert wait_for(lambda: server.stats()["connections"] == 0)


def test_pipelined_request_behind_a_parked_one_waits_its_turn(server, app, client):
    client.send(b"GET /park HTTP/1.1\r\nHost: t\r\n\r\nGET /echo?next HTTP/1.1\r\nHost: t\r\n\r\n")
    assert parked(server)
    assert app.hits["/echo"] == 0
    time.sleep(0.05)
    assert app.hits["/echo"] == 0
    app.parked[0].resolve(Response(200, b'{"first":true}'))
    assert client.read_response().json == {"first": True}
    assert client.read_response().json["query"] == "next"


def test_a_thousand_parked_connections_answered_by_one_broadcast(make_server, app):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2600:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    n = 1000
    server = make_server(app)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(server.address, timeout=5)
            s.sendall(b"GET /park HTTP/1.1\r\nHost: t\r\n\r\n")
            socks.append(s)
        assert wait_for(lambda: server.stats()["parked"] == n, timeout=10)
        body = b'{"event":"hello"}'

        def broadcast():  # on the loop thread, like the realtime hub's fan-out
            for d in list(app.parked):
                d.resolve(Response(200, body))

        server.loop.call_soon_threadsafe(broadcast)
        expected = b"HTTP/1.1 200 OK\r\n"
        sel = selectors.DefaultSelector()
        got = {}
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            got[s] = b""
        done = 0
        deadline = time.monotonic() + 10
        while done < n and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                s = key.fileobj
                got[s] += s.recv(4096)
                if got[s].endswith(body):
                    sel.unregister(s)
                    done += 1
        assert done == n
        assert all(v.startswith(expected) for v in got.values())
        assert server.stats()["parked"] == 0
        sel.close()
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: server.stats()["connections"] == 0, timeout=5)
    assert app.cancelled == []
    assert server.stats()["timers"] < 50


def test_resolving_many_from_another_thread(server, app):
    clients = [Client(server.address) for _ in range(50)]
    try:
        for c in clients:
            c.get("/park")
        assert parked(server, 50)
        for d in list(app.parked):
            d.resolve(Response(200, b'{"ok":1}'))
        for c in clients:
            assert c.read_response().json == {"ok": 1}
    finally:
        for c in clients:
            c.close()


def test_client_gone_before_a_worker_returns_its_deferred(make_server, app):
    app.routes["/slow-park"], gate = gated(app._park)
    server = make_server(app)
    c = Client(server.address)
    c.get("/slow-park")
    assert wait_for(lambda: server.stats()["in_flight"] == 1)
    c.close()
    time.sleep(0.05)
    gate.set()
    assert wait_for(lambda: len(app.cancelled) == 1)
    assert wait_for(lambda: server.stats()["connections"] == 0 and server.stats()["parked"] == 0)
