"""`PeerMonitor` against a real (tiny) HTTP server and a closed port."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hachat.cluster import Node, PeerMonitor, PeerUnreachable, Role, fetch_health
from hachat.settings import ClusterSettings

ALIVE_ACTIVE = {"status": "alive", "active": True, "node": "peer", "epoch": 3}


class FakePeer:
    """Answers GET /health with `self.report` (or hangs / garbage) on 127.0.0.1:<free port>."""

    def __init__(self, report=None):
        self.report = dict(report or ALIVE_ACTIVE)
        self.mode = "json"  # json | hang | garbage
        self.hits = 0
        self.release = threading.Event()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                peer.hits += 1
                if peer.mode == "hang":
                    peer.release.wait(5)
                    return
                body = (b"<html>" if peer.mode == "garbage"
                        else json.dumps(peer.report).encode())
                self.send_response(200 if self.path == "/health" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def settings(peer_url, **kw) -> ClusterSettings:
    values = dict(node_id="me", public_url="http://me.test", peer_url=peer_url,
                  health_interval=0.05, health_timeout=0.2, health_failures=3,
                  lease_ttl=1.0, lease_renew_interval=0.2)
    values.update(kw)
    return ClusterSettings(**values)


@pytest.fixture
def peer():
    fake = FakePeer()
    yield fake
    fake.close()


def wait_until(predicate, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_no_peer_means_down_and_no_thread():
    monitor = PeerMonitor(settings(None))
    monitor.start()
    assert monitor.peer_down is True
    assert monitor.peer_url is None and monitor.peer_report is None
    assert monitor._thread is None
    monitor.stop()


def test_fetch_health(peer):
    assert fetch_health(peer.url, 1.0) == ALIVE_ACTIVE
    assert fetch_health(peer.url + "/", 1.0) == ALIVE_ACTIVE
    peer.mode = "garbage"
    with pytest.raises(PeerUnreachable):
        fetch_health(peer.url, 1.0)
    with pytest.raises(PeerUnreachable):
        fetch_health(closed_port_url(), 1.0)


def test_alive_active_peer_is_up_and_tells_the_node(peer):
    node = Node(settings(peer.url))
    node.transition(Role.PASSIVE, "start")
    monitor = PeerMonitor(settings(peer.url), node)
    assert monitor.poll_once() is False
    assert monitor.peer_report == ALIVE_ACTIVE
    assert node.leader_url == peer.url


@pytest.mark.parametrize("report", [
    {"status": "down", "active": False},
    {"status": "alive", "active": False},
    {"status": "alive"},
    {"status": "alive", "active": "yes"},
])
def test_a_peer_saying_it_is_down_or_not_active_is_down_at_once(peer, report):
    monitor = PeerMonitor(settings(peer.url))
    assert monitor.poll_once() is False
    peer.report = report
    assert monitor.poll_once() is True
    assert monitor.peer_report == report and monitor.failures == 0


def test_failures_in_a_row_then_recovery(peer):
    flips = []
    monitor = PeerMonitor(settings(peer.url), on_change=flips.append)
    assert monitor.poll_once() is False
    peer.mode = "garbage"
    assert [monitor.poll_once() for _ in range(3)] == [False, False, True]
    assert monitor.failures == 3 and monitor.peer_report is None
    assert flips == [True]
    peer.mode = "json"
    assert monitor.poll_once() is False
    assert flips == [True, False]


def test_thread_detects_an_unreachable_peer_and_wakes_subscribers():
    monitor = PeerMonitor(settings(closed_port_url()))
    woke = threading.Event()
    monitor.subscribe(lambda down: down and woke.set())
    started = time.monotonic()
    monitor.start()
    try:
        assert woke.wait(2.0)
        took = time.monotonic() - started
        # 3 failures at a 0.05 s interval: the third poll is at about 0.1 s.
        assert took < 1.0, took
        assert monitor.peer_down and monitor.failures >= 3
    finally:
        monitor.stop()


def test_a_hanging_peer_counts_as_failures_at_a_steady_rate(peer):
    peer.mode = "hang"
    monitor = PeerMonitor(settings(peer.url, health_interval=0.1, health_timeout=0.08))
    started = time.monotonic()
    monitor.start()
    try:
        assert wait_until(lambda: monitor.peer_down, 3.0)
        took = time.monotonic() - started
        assert 0.15 < took < 1.0, took  # 3 timeouts, one per interval
    finally:
        monitor.stop()
        peer.release.set()


def test_stop_ends_polling(peer):
    monitor = PeerMonitor(settings(peer.url))
    monitor.start()
    assert wait_until(lambda: peer.hits >= 2)
    monitor.stop()
    hits = peer.hits
    time.sleep(0.2)
    assert peer.hits <= hits + 1
