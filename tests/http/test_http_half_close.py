"""A client that half-closes (`shutdown(SHUT_WR)`) after its requests still reads: it gets the
answer to every request it sent whole, then the server closes. A client that really went away
(RST, or a full close) is still dropped at once, its parked request cancelled.

Regression: a FIN while a request was parked, or before a worker handed its Deferred back,
cancelled the request and closed without an answer, though a `working` one (a message being
committed) may already have taken effect; with pipelined requests only the first was answered.
"""

from __future__ import annotations

import socket
import time

import pytest
from http_testkit import BIG, Client, gated, wait_for

from hachat.http.messages import Response

POST = (b"POST /work HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 13\r\n\r\n{\"text\":\"hi\"}")


def half_close(c: Client) -> None:
    c.sock.shutdown(socket.SHUT_WR)


def answered_then_closed(c: Client) -> list:
    """Every response up to the server's close (interim 1xx ones included)."""
    replies = []
    while True:
        try:
            replies.append(c.read_response())
        except ConnectionError:
            return replies


def finals(replies: list) -> list:
    return [r for r in replies if r.status >= 200]


def test_half_closed_client_gets_the_answer_to_a_working_request(server, app):
    with Client(server.address) as c:
        c.send(POST)
        assert wait_for(lambda: server.stats()["parked"] == 1)
        half_close(c)
        replies = finals(answered_then_closed(c))
    assert [r.status for r in replies] == [201]
    assert replies[0].json == {"stored": '{"text":"hi"}'}
    assert replies[0].headers["connection"] == "close"
    assert app.cancelled == []
    assert wait_for(lambda: server.stats()["connections"] == 0 and server.stats()["parked"] == 0)


def test_half_close_before_the_worker_returns_its_deferred(make_server, app):
    app.routes["/slow-work"], gate = gated(app._work)
    server = make_server(app)
    with Client(server.address) as c:
        c.send(POST.replace(b"/work", b"/slow-work") + b"")
        half_close(c)
        assert wait_for(lambda: server.stats()["in_flight"] == 1)
        time.sleep(0.1)  # the FIN is seen while the handler runs
        gate.set()
        replies = finals(answered_then_closed(c))
    assert [r.status for r in replies] == [201]
    assert app.cancelled == []


def test_every_pipelined_request_before_the_half_close_is_answered(server, app):
    with Client(server.address) as c:
        c.send(b"GET /echo?1 HTTP/1.1\r\nHost: t\r\n\r\n"
               b"GET /slow?0.1 HTTP/1.1\r\nHost: t\r\n\r\n"
               + POST +
               b"GET /worker?4 HTTP/1.1\r\nHost: t\r\n\r\n")
        half_close(c)
        replies = finals(answered_then_closed(c))
    assert [r.status for r in replies] == [200, 200, 201, 200]
    assert replies[0].json["query"] == "1" and replies[3].json["query"] == "4"
    assert "connection" not in replies[0].headers
    assert replies[-1].headers["connection"] == "close"


def test_a_half_closed_client_still_gets_a_large_final_response(server):
    # Connection: close, so the answer is the last: the FIN arrives while most of it is still
    # queued for a socket the client is slow to read.
    with Client(server.address) as c:
        c.send(b"GET /big HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        half_close(c)
        time.sleep(0.3)
        replies = answered_then_closed(c)
    assert [r.status for r in replies] == [200]
    assert replies[0].body == BIG


def test_a_half_closed_long_poll_waits_for_its_answer(server, app):
    """A long-poll is a request to wait: a half-closed client asked for that as much as any,
    so it is answered when there is something to say (or at its timeout), not at once."""
    with Client(server.address) as c:
        c.get("/park")
        assert wait_for(lambda: server.stats()["parked"] == 1)
        half_close(c)
        interim = c.read_response()  # see test_a_vanished_client_is_found_by_the_probe
        assert interim.status == 100
        time.sleep(0.3)
        assert server.stats()["parked"] == 1 and app.cancelled == []
        app.parked[0].resolve(Response(200, b'{"late":true}'))
        replies = answered_then_closed(c)
    assert [r.json for r in replies] == [{"late": True}]
    assert wait_for(lambda: server.stats()["connections"] == 0)


def test_a_half_closed_long_poll_times_out_as_usual(server, app):
    with Client(server.address) as c:
        started = time.monotonic()
        c.get("/park?0.4")
        half_close(c)
        replies = finals(answered_then_closed(c))
        elapsed = time.monotonic() - started
    assert [r.json for r in replies] == [{"timeout": True}]
    assert 0.4 <= elapsed < 1.5
    assert app.cancelled == []


@pytest.mark.parametrize("how", ["close", "reset", "close_after_reading_the_probe"])
def test_a_vanished_client_is_found_by_the_probe(server, app, how):
    """A FIN alone does not tell a half-close from a full close. So the server sends an interim
    `100 Continue` (any HTTP/1.1 client must accept one): a socket that was fully closed
    answers it with a reset, and the parked request is cancelled at once."""
    c = Client(server.address)
    c.get("/park")
    assert wait_for(lambda: server.stats()["parked"] == 1)
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()
    elif how == "close":
        c.close()
    else:  # half-close, read the probe, then close for good: found when the answer goes out
        half_close(c)
        assert c.read_response().status == 100
        c.close()
        time.sleep(0.1)
        assert server.stats()["parked"] == 1
        app.parked[0].resolve(Response(200, b"{}"))
        assert wait_for(lambda: server.stats()["connections"] == 0)
        return
    assert wait_for(lambda: app.cancelled == app.parked, timeout=2)
    assert wait_for(lambda: server.stats()["connections"] == 0 and server.stats()["parked"] == 0)


def test_a_vanished_client_is_dropped_while_its_worker_runs(make_server, app):
    app.routes["/slow-work"], gate = gated(app._work)
    server = make_server(app)
    c = Client(server.address)
    c.send(POST.replace(b"/work", b"/slow-work"))
    assert wait_for(lambda: server.stats()["in_flight"] == 1)
    c.close()
    assert wait_for(lambda: server.stats()["connections"] == 0)
    gate.set()
    assert wait_for(lambda: len(app.cancelled) == 1)
    assert wait_for(lambda: server.stats()["parked"] == 0 and server.stats()["in_flight"] == 0)


def test_http10_half_closed_long_poll_is_answered_at_once(server, app):
    """HTTP/1.0 allows no interim response, so there is no probe: a FIN could be a client that
    is gone. A waiting long-poll is answered at once (as if it timed out) and leaves the
    waiters; a `working` request is answered when its work is done."""
    with Client(server.address) as c:
        c.send(b"GET /park HTTP/1.0\r\n\r\n")
        assert wait_for(lambda: server.stats()["parked"] == 1)
        half_close(c)
        replies = answered_then_closed(c)
    assert [r.json for r in replies] == [{"timeout": True}]
    assert app.cancelled == []
    with Client(server.address) as c:
        c.send(POST.replace(b"HTTP/1.1", b"HTTP/1.0"))
        half_close(c)
        replies = answered_then_closed(c)
    assert [r.status for r in replies] == [201]
    assert server.stats()["parked"] == 0
