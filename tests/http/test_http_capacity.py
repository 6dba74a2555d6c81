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


def _outward_address() -> str | None:
    """This machine's address on its outward interface, if it has one (no packet is sent)."""
    import ipaddress
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


def test_one_address_cannot_take_every_connection(make_server):
    """Regression: any client could hold every one of MAX_CONNECTIONS (an unauthenticated
    `GET /subscribe/status` holds one for 60 s) and the server served nobody else until they
    closed. Past MAX_CONNECTIONS_PER_ADDRESS from one address, a new connection gets 503
    too_many_connections and is closed; other addresses, and loopback (a proxy on this
    machine), are not held to it."""
    import pytest

    address = _outward_address()
    if address is None:
        pytest.skip("no address but loopback to connect from")
    server = make_server(host="0.0.0.0", max_connections=50, max_connections_per_address=4)
    port = server.address[1]
    held = [Client((address, port)) for _ in range(4)]
    for c in held:
        assert c.request().status == 200
    extra = Client((address, port))
    refused = extra.read_response()
    assert refused.status == 503 and refused.json["error"] == "too_many_connections"
    assert refused.headers.get("connection") == "close" and "retry-after" in refused.headers
    assert extra.wait_closed()
    # loopback is not counted: a local proxy carries every client's connections
    local = [Client(("127.0.0.1", port)) for _ in range(8)]
    for c in local:
        assert c.request().status == 200
    # a slot freed is a slot again
    held[0].close()
    assert wait_for(lambda: server.stats()["connections"] == 3 + 8)
    again = Client((address, port))
    assert again.request().status == 200
    for c in held[1:] + local + [again, extra]:
        c.close()
    assert wait_for(lambda: server.stats()["connections"] == 0)
