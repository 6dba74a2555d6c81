"""Requests that break the rules: exact status, Connection: close, nothing served after them,
and the server still serving a fresh connection. Plus limits and timeouts."""

from __future__ import annotations

import random
import threading
import time

import pytest
from http_testkit import Client, wait_for

MALFORMED = {
    "http11_without_host": (b"GET /health HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "two_hosts": (b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
    "two_same_hosts": (b"GET /health HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400, "bad_request"),
    "te_gzip": (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
                501, "unsupported_transfer_coding"),
    "te_gzip_chunked": (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n"
                        b"\r\n0\r\n\r\n", 501, "unsupported_transfer_coding"),
    "te_chunked_gzip": (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n"
                        b"\r\n", 501, "unsupported_transfer_coding"),
    "te_twice": (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501,
                 "unsupported_transfer_coding"),
    "cl_and_te": (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    "te_and_cl": (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Length: 5\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    "duplicate_cl": (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                     b"Content-Length: 3\r\n\r\nabc", 400, "bad_request"),
    "conflicting_cl": (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                       b"Content-Length: 4\r\n\r\nabcd", 400, "bad_request"),
    "cl_list": (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 3\r\n\r\nabc",
                400, "bad_request"),
    "cl_not_a_number": (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
                        400, "bad_request"),
    "cl_signed": (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
                  400, "bad_request"),
    "cl_negative": (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
                    400, "bad_request"),
    "empty_header_name": (b"GET /health HTTP/1.1\r\nHost: t\r\n: nameless\r\n\r\n",
                          400, "bad_request"),
    "space_before_colon": (b"GET /health HTTP/1.1\r\nHost : t\r\n\r\n", 400, "bad_request"),
    "chunked_on_http10": (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                          400, "bad_request"),
    "bad_chunk_size": (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nhello\r\n0\r\n\r\n", 400, "bad_request"),
    "bare_lf": (b"GET /health HTTP/1.1\nHost: t\n\n", 400, "bad_request"),
    "obs_fold": (b"GET /health HTTP/1.1\r\nHost: t\r\nX-A: a\r\n  b\r\n\r\n", 400, "bad_request"),
    "invalid_method": (b"FOO /health HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "bad_request"),
    "nul_in_header": (b"GET /health HTTP/1.1\r\nHost: t\x00x\r\n\r\n", 400, "bad_request"),
    "upgrade_chunked": (b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                        b"Upgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                        400, "bad_request"),
    "connect": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n",
                400, "bad_request"),
    "asterisk_target": (b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
    "relative_target": (b"GET health HTTP/1.1\r\nHost: t\r\n\r\n", 400, "bad_request"),
    "http2_version": (b"GET /health HTTP/2.0\r\nHost: t\r\n\r\n", 505,
                      "http_version_not_supported"),
    "http09_version": (b"GET /health HTTP/0.9\r\nHost: t\r\n\r\n", 505,
                       "http_version_not_supported"),
    "bad_version": (b"GET /health HTTP/1.7\r\nHost: t\r\n\r\n", 400, "bad_request"),
}


def assert_error_then_closed(client: Client, status: int, code: str) -> None:
    reply = client.read_response()
    assert reply.status == status, reply
    assert reply.headers["connection"] == "close"
    assert reply.headers["content-type"] == "application/json"
    assert reply.json["error"] == code
    assert isinstance(reply.json["message"], str)
    assert client.wait_closed()
    assert client.buf == b"", "nothing may follow the error response"


@pytest.mark.parametrize("raw,status,code", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request(server, app, raw, status, code):
    with Client(server.address) as c:
        c.send(raw)
        assert_error_then_closed(c, status, code)
    served_before = app.hits["/health"] + app.hits["/echo"]
    assert served_before == 0, "a bad request must never reach the app"
    with Client(server.address) as fresh:
        assert fresh.request("/health").status == 200


def test_pipelined_request_after_a_bad_one_is_not_served(server, app):
    with Client(server.address) as c:
        c.send(b"GET /echo?first HTTP/1.1\r\nHost: t\r\n\r\n"
               b"POST /echo?bad HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
               b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert c.read_response().json["query"] == "first"
        assert_error_then_closed(c, 400, "bad_request")
    assert app.hits["/echo"] == 1
    assert app.hits["/health"] == 0


def test_pipelined_after_bad_behind_a_slow_request(server, app):
    with Client(server.address) as c:
        c.send(b"GET /slow?0.2 HTTP/1.1\r\nHost: t\r\n\r\n"
               b"GET /health HTTP/1.1\r\n\r\n"  # no Host
               b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert c.read_response().json == {"slow": True}
        assert_error_then_closed(c, 400, "bad_request")
    assert app.hits["/health"] == 0


def test_header_block_too_large(server):
    with Client(server.address) as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        for i in range(40):
            c.send(f"X-Filler-{i}: {'a' * 500}\r\n".encode())
        c.send(b"\r\n")
        assert_error_then_closed(c, 431, "header_too_large")
    with Client(server.address) as fresh:
        assert fresh.request("/health").status == 200


def test_one_huge_header_value_without_end(server):
    with Client(server.address) as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: ")
        c.send(b"a" * 8000)
        c.send(b"a" * 8000)
        c.send(b"a" * 8000)  # never finished
        assert_error_then_closed(c, 431, "header_too_large")


def test_endless_request_line(server):
    with Client(server.address) as c:
        c.send(b"GET /")
        for _ in range(5):
            c.send(b"a" * 5000)  # no CRLF, ever
        assert_error_then_closed(c, 431, "header_too_large")
    with Client(server.address) as fresh:
        assert fresh.request("/health").status == 200


def test_big_content_length_is_refused_without_reading_the_body(make_server, app):
    server = make_server(app, max_body_bytes=1024)
    with Client(server.address) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n")
        assert_error_then_closed(c, 413, "body_too_large")
    with Client(server.address) as c:  # with Expect: no 100 Continue, straight 413
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n"
               b"Expect: 100-continue\r\n\r\n")
        assert_error_then_closed(c, 413, "body_too_large")
    with Client(server.address) as c:  # exactly the limit is fine
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1024\r\n\r\n" + b"b" * 1024)
        assert len(c.read_response().json["body"]) == 1024
    assert app.hits["/echo"] == 1


def test_chunked_body_past_the_limit(make_server, app):
    server = make_server(app, max_body_bytes=1024)
    with Client(server.address) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            c.send(b"200\r\n" + b"c" * 512 + b"\r\n")
        assert_error_then_closed(c, 413, "body_too_large")
    assert app.hits["/echo"] == 0
    with Client(server.address) as fresh:
        assert fresh.request("/health").status == 200


CHUNKED_HEAD = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("pieces", [
    [CHUNKED_HEAD + b"FFFFFFF\r\n"],  # one chunk declared far past the limit, no data
    [CHUNKED_HEAD + b"401\r\nabc"],  # 1025 declared, a little data
    [CHUNKED_HEAD + b"200\r\n" + b"c" * 512 + b"\r\n201;ext=1\r\n"],  # the sum is past it
    [CHUNKED_HEAD + b"0000000000000", b"401\r\n"],  # the size line split across reads
    [CHUNKED_HEAD, b"4", b"0", b"1\r\n"],  # ... in three
    [CHUNKED_HEAD[:-2], b"\r\n4", b"01\r\nx"],
], ids=["huge", "data_follows", "sum", "split", "dribbled", "after_head"])
def test_declared_chunk_sizes_past_the_limit_are_refused_at_once(make_server, app, pieces):
    """Regression: a chunk-size line declaring more than MAX_BODY_BYTES was not refused until
    that much data came; a client that sent no more got 408 after HEADER_TIMEOUT. Now the sum
    of the declared sizes is checked as soon as each size line is read: 413 at once."""
    server = make_server(app, max_body_bytes=1024, header_timeout=10)
    with Client(server.address) as c:
        started = time.monotonic()
        for piece in pieces:
            c.send(piece)
            time.sleep(0.05)
        assert_error_then_closed(c, 413, "body_too_large")
        assert time.monotonic() - started < 2
    assert app.hits["/echo"] == 0


def test_chunked_bodies_up_to_the_limit_still_pass(make_server, app):
    server = make_server(app, max_body_bytes=1024, header_timeout=10)
    with Client(server.address) as c:
        c.send(CHUNKED_HEAD + b"200\r\n" + b"a" * 512 + b"\r\n")
        time.sleep(0.05)
        c.send(b"0000200;name=\"v\"\r\n")  # leading zeros and an extension: 512 more
        time.sleep(0.05)
        c.send(b"b" * 512 + b"\r\n0\r\n")
        time.sleep(0.05)
        c.send(b"abc: def\r\n")  # a trailer whose name looks like a chunk size
        time.sleep(0.05)
        c.send(b"\r\n")
        reply = c.read_response()
        assert reply.status == 200 and reply.json["body"] == "a" * 512 + "b" * 512
        c.send(CHUNKED_HEAD + b"3\r\nabc\r\n0\r\nabc: def\r\n")  # trailer in the same read
        time.sleep(0.05)
        c.send(b"\r\n")
        assert c.read_response().json["body"] == "abc"


def test_chunked_bodies_cut_anywhere_are_read_alike(make_server, app):
    """The size check reads the raw bytes of each read: wherever the reads are cut, a body
    within the limit passes and one past it is refused."""
    server = make_server(app, max_body_bytes=1024, header_timeout=10)
    good = (CHUNKED_HEAD + b"00f0;a=1\r\n" + b"g" * 240 + b"\r\n300\r\n" + b"h" * 768
            + b"\r\n0\r\nab: 1\r\nc0ffee: 2\r\n\r\n")
    bad = CHUNKED_HEAD + b"00f0;a=1\r\n" + b"g" * 240 + b"\r\n0311\r\n" + b"h" * 100
    rng = random.Random(7)
    for _ in range(12):
        for raw, ok in ((good, True), (bad, False)):
            cuts = sorted(rng.sample(range(len(CHUNKED_HEAD) - 4, len(raw)), 5))
            with Client(server.address) as c:
                for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
                    c.send(raw[a:b])
                    time.sleep(0.003)
                if ok:
                    reply = c.read_response()
                    assert reply.status == 200 and len(reply.json["body"]) == 1008, cuts
                else:
                    assert_error_then_closed(c, 413, "body_too_large")


def test_an_endless_chunk_size_line_is_refused(make_server, app):
    server = make_server(app, max_body_bytes=1024, header_timeout=10)
    with Client(server.address) as c:
        c.send(CHUNKED_HEAD)
        for _ in range(3):  # leading zeros: the parser takes any number of them
            time.sleep(0.05)
            c.send(b"0" * 3000)
        time.sleep(0.05)
        c.send(b"1\r\n")
        assert_error_then_closed(c, 400, "bad_request")
    assert app.hits["/echo"] == 0


def test_header_timeout_sends_408_and_closes(make_server):
    server = make_server(header_timeout=0.3, keepalive_timeout=5)
    with Client(server.address) as c:
        started = time.monotonic()
        c.send(b"GET /health HTTP/1.1\r\nHost: t\r\n")  # headers never finish
        assert_error_then_closed(c, 408, "request_timeout")
        assert 0.25 <= time.monotonic() - started < 1.5
    with Client(server.address) as c:  # a body that never finishes
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        assert_error_then_closed(c, 408, "request_timeout")
    with Client(server.address) as c:  # after a first request, a dribbled second one
        assert c.request("/health").status == 200
        c.send(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.1)
        c.send(b"Host: t\r\n")
        assert_error_then_closed(c, 408, "request_timeout")
    assert wait_for(lambda: server.stats()["connections"] == 0)


def test_idle_keep_alive_connection_closes_silently(make_server):
    server = make_server(header_timeout=5, keepalive_timeout=0.3)
    with Client(server.address) as c:
        assert c.request("/health").status == 200
        started = time.monotonic()
        assert c.wait_closed(timeout=3)
        assert c.buf == b""
        assert 0.25 <= time.monotonic() - started < 1.5
    assert wait_for(lambda: server.stats()["connections"] == 0)


def test_keep_alive_timer_restarts_with_each_request(make_server):
    server = make_server(header_timeout=5, keepalive_timeout=0.4)
    with Client(server.address) as c:
        for _ in range(4):
            assert c.request("/health").status == 200
            time.sleep(0.25)  # each pause is shorter than the timeout
        assert c.request("/health").status == 200


def test_silent_new_connection_is_closed_after_header_timeout(make_server):
    server = make_server(header_timeout=0.3, keepalive_timeout=5)
    with Client(server.address) as c:
        assert c.wait_closed(timeout=3)
        assert c.buf == b""


def test_endless_trailer_is_bounded(make_server, app):
    server = make_server(app, max_body_bytes=1024)
    with Client(server.address) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\nX-Trailer: ")
        for _ in range(20):  # bound: 2 x max_body_bytes + max_header_bytes of raw input
            c.send(b"t" * 1024)
        assert_error_then_closed(c, 413, "body_too_large")
    assert app.hits["/echo"] == 0


def _send_for(sock, data: bytes, seconds: float) -> int:
    """Send what the server takes within `seconds` (without blocking): the bytes sent."""
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.005)
    sock.setblocking(True)
    return sent


def test_parsed_ahead_requests_are_bounded_in_bytes_not_only_in_number(make_server, app):
    """Regression: behind a request in progress (a long-poll), the server parsed ahead up to
    32 pipelined requests whatever their size: 32 x MAX_BODY_BYTES held per connection
    (4 MiB at the default 128 KiB, 32 MiB at the old 1 MiB), so a few hundred unauthenticated
    connections took gigabytes. Reading now pauses once the queued requests hold 64 KiB."""
    server = make_server(app, max_body_bytes=128 * 1024)
    body = b"x" * (100 * 1024)
    post = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    data = b"GET /park?30 HTTP/1.1\r\nHost: t\r\n\r\n" + post * 40
    clients = [Client(server.address) for _ in range(3)]
    senders = []
    try:
        sent = [_send_for(c.sock, data, 1.0) for c in clients]
        assert wait_for(lambda: server.stats()["parked"] == 3)
        time.sleep(0.3)
        held = server.stats()["queued_bytes"]
        # per connection: the 64 KiB budget, plus what one read and the request being read
        # add before reading pauses (one body at most)
        assert held <= 3 * (64 * 1024 + 64 * 1024 + len(post)), held
        # the queue still drains in order once the long-polls are answered
        for deferred in app.parked:
            deferred.resolve(app.routes["/health"].fn(None))
        for c, n in zip(clients, sent, strict=True):
            c.sock.settimeout(10)
            senders.append(threading.Thread(target=c.sock.sendall, args=(data[n:],)))
            senders[-1].start()
        for c in clients:
            assert c.read_response().status == 200
            for _ in range(40):
                assert c.read_response().status == 200
    finally:
        for thread in senders:
            thread.join(10)
        for c in clients:
            c.close()
    assert wait_for(lambda: server.stats()["queued_bytes"] == 0)


UPGRADE = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAA\r\n"


def test_an_upgrade_offer_is_ignored_and_the_request_served(server, app):
    """Regression: a request offering a protocol upgrade was 400 "protocol upgrades are not
    supported", so `curl --http2 http://...` (which offers h2c) failed on every request. An
    Upgrade header is an offer a server may ignore (RFC 9110, 7.8): the request is served as
    HTTP/1.1, with its body, and the connection goes on in HTTP/1.1."""
    with Client(server.address) as c:
        c.send(f"GET /echo?one HTTP/1.1\r\nHost: t\r\n{UPGRADE}\r\n".encode()
               + b"GET /echo?two HTTP/1.1\r\nHost: t\r\n\r\n")
        first = c.read_response()
        assert first.status == 200 and first.json["query"] == "one", first.body
        assert c.read_response().json["query"] == "two"
        body = b'{"hello": "world"}'
        head = (f"POST /echo?three HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
                f"{UPGRADE}\r\n").encode()
        c.send(head + body[:5])  # the body comes in pieces, and a request after it
        time.sleep(0.05)
        c.send(body[5:] + b"GET /echo?four HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                          b"Upgrade: websocket\r\n\r\n")
        third = c.read_response()
        assert third.status == 200 and third.json["query"] == "three", third.body
        assert third.json["method"] == "POST" and third.json["body"] == body.decode()
        assert third.json["headers"]["upgrade"] == "h2c"
        assert c.read_response().json["query"] == "four"
        assert c.request("/health").status == 200
    assert app.hits["/echo"] == 4


def test_an_upgrade_offer_with_expect_continue_gets_its_100(server):
    with Client(server.address) as c:
        c.send(f"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
               f"Expect: 100-continue\r\n{UPGRADE}\r\n".encode())
        interim = c.read_response()
        assert interim.status == 100
        c.send(b"{}")
        final = c.read_response()
        assert final.status == 200 and final.json["body"] == "{}"
