"""Keep-alive, pipelining, HTTP/1.0, bodies, HEAD, errors and threads: raw bytes on a socket."""

from __future__ import annotations

import json

from http_testkit import App, Client, Route, wait_for

from hachat.http.messages import Response


def test_keep_alive_serves_many_requests_on_one_connection(server, client):
    for _ in range(5):
        reply = client.request("/health")
        assert reply.status == 200
        assert reply.json == {"status": "alive", "active": True}
        assert reply.headers["content-type"] == "application/json"
        assert reply.headers["content-length"] == str(len(reply.body))
        assert reply.headers["date"].endswith(" GMT")
        assert "connection" not in reply.headers
    assert server.stats()["accepted"] == 1


def test_pipelined_requests_are_answered_in_order(client):
    # The first goes to a worker and is slow; the others are inline: order must still hold.
    client.send(b"GET /slow?0.2 HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /echo?second HTTP/1.1\r\nHost: t\r\n\r\n"
                b"POST /echo?third HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
    first, second, third = (client.read_response() for _ in range(3))
    assert first.json == {"slow": True}
    assert second.json["query"] == "second"
    assert third.json["query"] == "third" and third.json["body"] == "hello"


def test_request_fields(server, client):
    client.send(b"POST /echo?a=1&b=%20 HTTP/1.1\r\nHost: example\r\nX-Multi: one\r\n"
                b"x-multi: two\r\nContent-Length: 3\r\n\r\nabc")
    data = client.read_response().json
    assert data["method"] == "POST"
    assert data["target"] == "/echo?a=1&b=%20"
    assert data["path"] == "/echo"
    assert data["query"] == "a=1&b=%20"
    assert data["headers"]["host"] == "example"
    assert data["headers"]["x-multi"] == "one, two"
    assert data["body"] == "abc"
    assert data["version"] == "1.1" and data["keep_alive"] is True
    assert data["client"] == list(client.sock.getsockname())


def test_path_is_percent_decoded(make_server):
    seen = []
    app = App({"/a b/é": Route(lambda r: seen.append(r.path) or Response(200, b"{}"))})
    server = make_server(app)
    with Client(server.address) as c:
        assert c.request("/a%20b/%C3%A9").status == 200
    assert seen == ["/a b/é"]


def test_http10_without_keep_alive_closes(client):
    client.get("/echo", version="1.0")
    reply = client.read_response()
    assert reply.status == 200
    assert reply.json["version"] == "1.0" and reply.json["keep_alive"] is False
    assert reply.headers["connection"] == "close"
    assert client.wait_closed()


def test_http10_with_keep_alive_stays_open(client):
    for _ in range(2):
        client.send(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        reply = client.read_response()
        assert reply.status == 200
        assert reply.headers["connection"] == "keep-alive"
        assert reply.json["keep_alive"] is True


def test_connection_close_is_honoured(client):
    reply = client.request("/health", "Connection: close\r\n")
    assert reply.status == 200 and reply.headers["connection"] == "close"
    assert client.wait_closed()


def test_response_close_closes_after_sending(client):
    reply = client.request("/close")
    assert reply.status == 200 and reply.headers["connection"] == "close"
    assert client.wait_closed()


def test_head_omits_body_but_keeps_length(client):
    client.send(b"HEAD /health HTTP/1.1\r\nHost: t\r\n\r\n")
    reply = client.read_response(head=True)
    assert reply.status == 200
    assert reply.headers["content-length"] == "32"
    assert reply.body == b""
    # The stream is still in sync: the next response parses.
    assert client.request("/health").json["status"] == "alive"


def test_expect_100_continue(client):
    client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n")
    interim = client.read_response()
    assert interim.status == 100 and interim.body == b""
    client.send(b"hello")
    reply = client.read_response()
    assert reply.status == 200 and reply.json["body"] == "hello"


def test_chunked_request_body(client):
    client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n")
    client.send(b"6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    reply = client.read_response()
    assert reply.status == 200 and reply.json["body"] == "hello world"
    assert client.request("/health").status == 200


def test_content_length_body_in_pieces(client):
    client.send(b"PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n01234")
    client.send(b"56789")
    assert client.read_response().json["body"] == "0123456789"


def test_handler_exception_is_500_json_and_server_goes_on(client, caplog):
    for path in ("/boom", "/boom-worker"):
        reply = client.request(path)
        assert reply.status == 500
        assert reply.json["error"] == "internal_error"
        assert client.request("/health").status == 200
    assert any("boom" in (r.exc_text or "") for r in caplog.records)


def test_http_error_from_app(client):
    reply = client.request("/nowhere")
    assert reply.status == 404
    assert reply.json == {"error": "not_found", "message": "no route for /nowhere"}
    reply = client.request("/teapot")
    assert reply.status == 418 and reply.headers["x-tea"] == "earl grey"
    assert reply.json["error"] == "teapot"
    assert client.request("/health").status == 200


def test_blocking_handlers_run_on_workers_and_inline_on_the_loop(client):
    assert client.request("/worker").json["thread"].startswith("hachat-http-worker-")
    assert client.request("/echo").json["thread"] == "hachat-http-loop"


def test_unknown_method_goes_to_the_app(make_server):
    def only_get(request):
        if request.method != "GET":
            from hachat.http.messages import HTTPError

            raise HTTPError(405, "method_not_allowed", request.method, [("Allow", "GET")])
        return Response(200, b"{}")

    server = make_server(App({"/x": Route(only_get)}))
    with Client(server.address) as c:
        c.send(b"PATCH /x HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        reply = c.read_response()
        assert reply.status == 405 and reply.headers["allow"] == "GET"
        assert json.loads(reply.body)["message"] == "PATCH"


def test_large_response_is_sent_whole(make_server):
    big = b"x" * (8 * 1024 * 1024)
    server = make_server(App({"/big": Route(lambda r: Response(200, big, "text/plain"))}))
    with Client(server.address) as c:
        c.get("/big")
        c.get("/health")
        reply = c.read_response()
        assert reply.body == big
        assert c.read_response().status == 200


def test_many_connections_leave_nothing_behind(server):
    for _ in range(50):
        with Client(server.address) as c:
            assert c.request("/health").status == 200
    assert wait_for(lambda: server.stats()["connections"] == 0)
    assert server.stats()["parked"] == 0
    assert server.stats()["requests"] >= 50


def test_deep_pipeline_is_served_in_order(server, client):
    # More than the parse-ahead cap: reading pauses and resumes as the queue drains.
    n = 100
    client.send(b"".join(b"GET /echo?%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(n)))
    for i in range(n):
        assert client.read_response().json["query"] == str(i)
    assert client.request("/health").status == 200


def test_stalled_reader_is_dropped(make_server):
    big = b"x" * (32 * 1024 * 1024)
    server = make_server(App({"/big": Route(lambda r: Response(200, big, "text/plain"))}),
                         keepalive_timeout=0.3)
    with Client(server.address) as c:
        c.get("/big")  # and never read
        assert wait_for(lambda: server.stats()["connections"] == 0, timeout=5)
