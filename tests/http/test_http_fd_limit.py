"""Open-file limits: each connection is a file descriptor.

Regression: with RLIMIT_NOFILE below MAX_CONNECTIONS the server accepted until accept() failed
with EMFILE (logging a warning every half second while it lasted). Now the server raises its
soft limit toward the hard one at start, caps its connections to what the limit allows (less a
reserve for the database, logs and the like), says so in one log line, and when accept still
fails for want of descriptors it backs off quietly and goes on serving the connections it has.

Each test runs a server in its own process, started with a low `ulimit -n`.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from http_testkit import Client, wait_for

HERE = Path(__file__).resolve().parent

SCRIPT = r"""
import json, logging, os, sys
sys.path.insert(0, sys.argv[2])
from http_testkit import App, Route
from hachat.http.messages import Response, dumps
from hachat.http.server import HTTPServer
from hachat.settings import HTTPSettings

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
hogged = []

def hog(request):
    try:
        while True:
            hogged.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    return Response(200, dumps({"hogged": len(hogged)}))

def unhog(request):
    while hogged:
        os.close(hogged.pop())
    return Response(200, b"{}")

app = App({"/stats": Route(lambda r: Response(200, dumps(server.stats()))),
           "/hog": Route(hog), "/unhog": Route(unhog)})
options = {"host": "127.0.0.1", "port": 0, "workers": 2, **json.loads(sys.argv[1])}
server = HTTPServer(app, HTTPSettings(**options))
print(server.bind()[1], flush=True)
server.serve_forever()
"""


class LimitedServer:
    def __init__(self, tmp_path: Path, soft: int, hard: int, **settings: object) -> None:
        self.log_path = tmp_path / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SCRIPT, json.dumps(settings), str(HERE)],
                stdout=subprocess.PIPE, stderr=log, text=True,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
        self.address = ("127.0.0.1", int(self.proc.stdout.readline()))
        self.clients: list[Client] = []

    def log(self) -> str:
        return self.log_path.read_text()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def parked_clients(self, n: int) -> list[Client]:
        out = []
        for _ in range(n):
            c = Client(self.address)
            c.get("/park")
            out.append(c)
        self.clients += out
        return out

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def limited(tmp_path):
    servers: list[LimitedServer] = []

    def start(soft: int, hard: int, **settings: object) -> LimitedServer:
        server = LimitedServer(tmp_path, soft, hard, **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def stats(c: Client) -> dict:
    return c.request("/stats").json


def test_the_soft_limit_is_raised_to_fit_max_connections(limited):
    server = limited(64, 1024, max_connections=200, fd_reserve=32)
    with Client(server.address) as c:
        assert stats(c)["max_connections"] == 200
        server.parked_clients(199)
        assert wait_for(lambda: stats(c)["parked"] == 199, timeout=10)
    log = server.log()
    assert "open-file limit raised from 64 to 232" in log, log
    assert "WARNING" not in log and "accept failed" not in log, log


def test_connections_are_capped_to_what_the_hard_limit_allows(limited):
    # the default MAX_CONNECTIONS (20,000) on a process that may open 128 files
    server = limited(128, 128, fd_reserve=32)
    with Client(server.address) as c:
        assert stats(c)["max_connections"] == 96
        server.parked_clients(120)
        assert wait_for(lambda: stats(c)["parked"] == 95, timeout=10)
        before = server.cpu_seconds()
        time.sleep(1.0)
        assert server.cpu_seconds() - before < 0.3  # the listener is not spinning
        s = stats(c)
        assert s["connections"] == 96 and s["parked"] == 95
        for waiting in server.clients[:10]:
            waiting.close()
        # ten slots freed: ten of those waiting in the backlog are taken in
        assert wait_for(lambda: stats(c)["accepted"] == 1 + 95 + 10, timeout=5)
        assert wait_for(lambda: stats(c)["parked"] == 95)
    log = server.log()
    lines = [line for line in log.splitlines() if "open-file limit" in line]
    assert len(lines) == 1 and lines[0].startswith("INFO"), log
    assert "at most 96 connections" in lines[0]
    assert "WARNING" not in log and "accept failed" not in log, log


def test_a_max_connections_setting_the_limit_cannot_meet_is_a_warning(limited):
    server = limited(128, 128, max_connections=500, fd_reserve=32)
    with Client(server.address) as c:
        assert stats(c)["max_connections"] == 96
    lines = [line for line in server.log().splitlines() if "open-file limit" in line]
    assert len(lines) == 1 and lines[0].startswith("WARNING"), lines
    assert "MAX_CONNECTIONS is 500" in lines[0]


def test_accept_backs_off_when_descriptors_run_out_and_keeps_serving(limited):
    server = limited(128, 128, fd_reserve=32)
    with Client(server.address) as c:
        assert c.request("/hog").json["hogged"] > 0  # every descriptor is taken now
        waiting = []
        for _ in range(5):
            w = socket.create_connection(server.address, timeout=5)  # the kernel's backlog
            w.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            waiting.append(w)
        before = server.cpu_seconds()
        for _ in range(15):  # the connections it has are served meanwhile
            assert c.request("/health").status == 200
            time.sleep(0.1)
        assert server.cpu_seconds() - before < 0.4  # backing off, not spinning
        assert stats(c)["connections"] == 1
        log = server.log()
        assert log.count("accept failed") == 1, log  # one line for the whole episode
        assert c.request("/unhog").status == 200
        for w in waiting:
            w.settimeout(5)
            assert w.recv(4096).startswith(b"HTTP/1.1 200 ")
            w.close()
    assert wait_for(lambda: "accepting connections again" in server.log(), timeout=2)
