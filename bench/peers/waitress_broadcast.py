"""waitress long-polling baseline for bench.realtime_bench, with waitress's defaults (4 threads,
100 connections). Run: python waitress_broadcast.py PORT STATS_PORT

A WSGI app can only wait by holding its thread: each GET /events blocks on its own
threading.Event, filed under each of the caller's groups; POST /messages sets every Event of
the group with one shared body. With 4 threads at most 4 requests wait in the app; the rest
(and the POST) queue behind them. Because those threads are all taken, GET /stats is also
served on STATS_PORT by a standard-library thread, with waitress's own counts.
"""

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from broadcast import Stream, empty_body, groups_of, wait_params
from waitress.server import create_server

stream = Stream()
lock = threading.Lock()
waiters: dict[int, set["Waiter"]] = {}
waiting = 0
JSON = [("Content-Type", "application/json")]


class Waiter:
    __slots__ = ("ready", "body")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.body = b""


def answer(start_response, status: str, body: bytes) -> list[bytes]:
    start_response(status, [*JSON, ("Content-Length", str(len(body)))])
    return [body]


def events(environ, start_response) -> list[bytes]:
    global waiting
    groups = groups_of(environ.get("HTTP_AUTHORIZATION"))
    if not groups:
        return answer(start_response, "401 Unauthorized", b'{"error":"unauthorized"}')
    query = dict(p.partition("=")[::2] for p in environ.get("QUERY_STRING", "").split("&") if p)
    since, timeout = wait_params(query.get("since"), query.get("timeout"))
    if since is None:
        return answer(start_response, "200 OK", empty_body(stream.cursor))
    w = Waiter()
    with lock:
        for g in groups:
            waiters.setdefault(g, set()).add(w)
        waiting += 1
    try:
        body = w.body if w.ready.wait(timeout) else empty_body(since)
    finally:
        with lock:
            waiting -= 1
            for g in groups:
                waiters.get(g, set()).discard(w)
    return answer(start_response, "200 OK", body)


def post_message(environ, start_response) -> list[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    doc = json.loads(environ["wsgi.input"].read(length))
    group_id = int(doc["groupId"])
    with lock:
        body, ack = stream.publish(group_id, str(doc["content"]))
        group = waiters.pop(group_id, ())
    for w in group:
        w.body = body
        w.ready.set()
    return answer(start_response, "201 Created", ack)


def app(environ, start_response) -> list[bytes]:
    route = (environ["REQUEST_METHOD"], environ["PATH_INFO"])
    if route == ("GET", "/events"):
        return events(environ, start_response)
    if route == ("POST", "/messages"):
        return post_message(environ, start_response)
    if route == ("GET", "/stats"):
        return answer(start_response, "200 OK", stream.stats(waiting))
    return answer(start_response, "404 Not Found", b'{"error":"not_found"}')


def serve_stats(port: int, server) -> None:
    """GET /stats on its own port and thread: waiters, waitress's open connections and the
    requests queued for a thread."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - the name http.server looks up
            body = stream.stats(waiting, connections=len(server.active_channels),
                                queued=len(server.task_dispatcher.queue),
                                threads=server.adj.threads)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, name="stats", daemon=True).start()


def main() -> None:
    # waitress warns "Task queue depth is N" under load; that is the load, not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = create_server(app, host="127.0.0.1", port=int(sys.argv[1]))
    serve_stats(int(sys.argv[2]), server)
    server.run()


if __name__ == "__main__":
    main()
