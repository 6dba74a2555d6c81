"""Start, shutdown, signals, the LoopHandle and stats."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from http_testkit import App, Client, wait_for

from hachat.http.messages import Response
from hachat.http.server import HTTPServer
from hachat.settings import HTTPSettings


def settings(**kw) -> HTTPSettings:
    return HTTPSettings(**{"host": "127.0.0.1", "port": 0, "workers": 2, **kw})


def test_bind_picks_a_free_port_and_address_is_set():
    server = HTTPServer(App(), settings())
    host, port = server.bind()
    assert host == "127.0.0.1" and port > 0
    assert server.address == (host, port)
    assert server.bind() == (host, port)  # idempotent
    server.shutdown()
    server.serve_forever()  # returns at once after shutdown


def test_graceful_shutdown(app):
    server = HTTPServer(app, settings())
    thread = server.start_background()
    assert thread.is_alive() and thread.daemon
    slow, waiting, idle = (Client(server.address) for _ in range(3))
    try:
        slow.get("/slow?0.5")
        assert wait_for(lambda: server.stats()["in_flight"] == 1)
        waiting.get("/park")
        assert wait_for(lambda: server.stats()["parked"] == 1)
        assert idle.request("/health").status == 200

        started = time.monotonic()
        stopper = threading.Thread(target=server.shutdown, kwargs={"grace": 5})
        stopper.start()

        reply = waiting.read_response()  # parked: 503 at once
        assert reply.status == 503 and reply.json["error"] == "shutting_down"
        assert reply.headers["connection"] == "close"
        assert app.cancelled == app.parked
        assert waiting.wait_closed()
        assert idle.wait_closed() and idle.buf == b""

        reply = slow.read_response()  # in flight: finished
        assert reply.status == 200 and reply.json == {"slow": True}
        assert reply.headers["connection"] == "close"
        assert slow.wait_closed()

        stopper.join(5)
        thread.join(5)
        assert not stopper.is_alive() and not thread.is_alive()
        assert time.monotonic() - started < 3
        stats = server.stats()
        assert stats["stopped"] and stats["connections"] == 0 and stats["parked"] == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(server.address, timeout=1)
        assert not any(t.name.startswith("hachat-http-worker") and t.is_alive()
                       for t in threading.enumerate())
    finally:
        for c in (slow, waiting, idle):
            c.close()
        server.shutdown()  # idempotent


def test_shutdown_grace_runs_out(app):
    server = HTTPServer(app, settings())
    thread = server.start_background()
    with Client(server.address) as c:
        c.get("/slow?1.5")
        assert wait_for(lambda: server.stats()["in_flight"] == 1)
        started = time.monotonic()
        server.shutdown(grace=0.2)
        assert time.monotonic() - started < 1.2
        assert c.wait_closed()
    thread.join(2)
    assert not thread.is_alive()


def test_loop_handle_before_and_during_serving():
    server = HTTPServer(App(), settings())
    loop = server.loop
    seen: list[tuple[str, bool]] = []
    done = threading.Event()
    loop.call_soon_threadsafe(lambda: seen.append(("early", loop.in_loop_thread())))
    assert not loop.in_loop_thread()
    server.start_background()
    try:
        def on_loop():
            seen.append(("soon", loop.in_loop_thread()))
            cancelled = loop.call_later(0.05, lambda: seen.append(("cancelled", True)))
            cancelled.cancel()
            loop.call_later(0.1, lambda: (seen.append(("later", loop.in_loop_thread())),
                                          done.set()))

        loop.call_soon_threadsafe(on_loop)
        assert done.wait(3)
        assert seen == [("early", True), ("soon", True), ("later", True)]
        # call_later from another thread is handed over to the loop
        other = threading.Event()
        loop.call_later(0.05, other.set)
        assert other.wait(3)
    finally:
        server.shutdown()


SCRIPT = r"""
import sys, threading
from hachat.http.messages import Deferred, Response
from hachat.http.server import HTTPServer, install_signal_handlers
from hachat.settings import HTTPSettings

class Health:
    blocking = False
    def __call__(self, request):
        if request.path == "/park":
            return Deferred(60, lambda: Response(504, b"{}"))
        return Response(200, b'{"status":"alive"}')

class App:
    def resolve(self, request):
        return Health()

server = HTTPServer(App(), HTTPSettings(host="127.0.0.1", port=0, workers=2))
host, port = server.bind()
install_signal_handlers(server, grace=2)
print(port, flush=True)
try:
    if sys.argv[1] == "main":
        server.serve_forever()
    else:
        server.start_background().join()
finally:
    print("finally", flush=True)
print("after", flush=True)
"""


@pytest.mark.parametrize("mode,sig", [("main", signal.SIGTERM), ("background", signal.SIGTERM),
                                      ("main", signal.SIGINT)])
def test_signal_means_graceful_shutdown_and_exit_zero(mode, sig):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with Client(("127.0.0.1", port)) as c, Client(("127.0.0.1", port)) as waiting:
            assert c.request("/health").status == 200
            waiting.get("/park")
            time.sleep(0.1)
            proc.send_signal(sig)
            reply = waiting.read_response()
            assert reply.status == 503 and reply.json["error"] == "shutting_down"
            assert c.wait_closed()
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "finally" in out
    assert "Traceback" not in err


def test_selectors_fallback_serves(monkeypatch, make_server, app):
    """Without epoll (not Linux) the loop runs on `selectors`: same behaviour."""
    from hachat.http import loop as loop_module

    monkeypatch.setattr(loop_module, "USE_EPOLL", False)
    server = make_server(app, keepalive_timeout=0.3)
    assert isinstance(server.loop._poller, loop_module._SelectorPoller)
    with Client(server.address) as c:
        c.send(b"GET /echo?1 HTTP/1.1\r\nHost: t\r\n\r\nGET /worker?2 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert c.read_response().json["query"] == "1"
        assert c.read_response().json["query"] == "2"
        c.get("/park")
        assert wait_for(lambda: server.stats()["parked"] == 1)
        server.loop.call_soon_threadsafe(app.parked[0].resolve, Response(200, b'{"x":1}'))
        assert c.read_response().json == {"x": 1}
        assert c.wait_closed()  # keep-alive timeout
    waiting = Client(server.address)
    waiting.get("/park")
    assert wait_for(lambda: server.stats()["parked"] == 1)
    waiting.close()
    assert wait_for(lambda: len(app.cancelled) == 1)
