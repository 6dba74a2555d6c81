"""Fixtures for the HTTP server tests: a real server on 127.0.0.1, port 0, per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from http_testkit import App, Client

from hachat.http.server import HTTPServer
from hachat.settings import HTTPSettings


@pytest.fixture
def make_server() -> Iterator[Callable[..., HTTPServer]]:
    servers: list[HTTPServer] = []

    def make(app: object | None = None, **settings: object) -> HTTPServer:
        options = {"host": "127.0.0.1", "port": 0, "workers": 4, **settings}
        server = HTTPServer(app or App(), HTTPSettings(**options))
        server.start_background()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown(grace=1.0)


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
def server(make_server, app) -> HTTPServer:
    return make_server(app)


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(server.address) as c:
        yield c
