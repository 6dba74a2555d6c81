"""Regression: there was no bound on open connections, so clients that never read could pin
unbounded memory. Past MAX_CONNECTIONS the server stops accepting until one closes."""

from __future__ import annotations

from http_testkit import Client, wait_for


def test_connections_beyond_the_cap_wait_in_the_backlog(make_server):
    server = make_server(max_connections=3)
    held = [Client(server.address) for _ in range(3)]
    for c in held:
        assert c.request().status == 200
    extra = Client(server.address, timeout=0.5)  # the kernel completes the handshake
    extra.get()
    try:
        extra.read_response()
        raise AssertionError("a connection beyond the cap was served")
    except TimeoutError:
        pass
    assert server.stats()["connections"] == 3
    held[0].close()
    extra.sock.settimeout(5)
    assert extra.read_response().status == 200  # accepted once a slot freed
    assert wait_for(lambda: server.stats()["connections"] == 3)
    for c in held[1:] + [extra]:
        c.close()
