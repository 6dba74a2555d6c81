"""Header values are text in UTF-8, like the bodies: the same characters whichever way they come.

Regression: values were decoded as Latin-1, so a non-ASCII value sent as UTF-8 (as curl and
most clients send it) reached the application as other characters than the same text in a JSON
body. A value that is not UTF-8 is kept, but reading it is a 400 `invalid_header`.
"""

from __future__ import annotations

import json

from http_testkit import App, Client, Route

from hachat.http.messages import Request, Response, dumps


def read_header(request: Request) -> Response:
    name = request.query_string
    return Response(200, dumps({"value": request.headers.get(name),
                                "via_method": request.header(name),
                                "present": name in request.headers}))


def make(make_server):
    return make_server(App({"/read": Route(read_header),
                            "/read-worker": Route(read_header, blocking=True),
                            "/ignore": Route(lambda r: Response(200, b'{"ok":true}'))}))


def get(c: Client, path: str, header: bytes):
    c.send(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nX-Key: " + header + b"\r\n\r\n")
    return c.read_response()


def test_utf8_header_values_arrive_as_the_same_text(make_server):
    server = make(make_server)
    with Client(server.address) as c:
        for text in ("ключ-é", "日本語", "plain ascii", "emoji \U0001f600", "tab\there"):
            reply = get(c, "/read?x-key", text.encode("utf-8"))
            assert reply.json == {"value": text, "via_method": text, "present": True}
            assert reply.json["value"] == json.loads(json.dumps(text))  # as in a JSON body


def test_reading_a_header_that_is_not_utf8_is_a_400(make_server):
    server = make(make_server)
    with Client(server.address) as c:
        for raw in (b"caf\xe9", b"\xff\xfe", b"ok \xc3", b"\xed\xa0\x80"):  # the last: a surrogate
            for path in ("/read?x-key", "/read-worker?x-key"):
                reply = get(c, path, raw)
                assert reply.status == 400, raw
                assert reply.json["error"] == "invalid_header"
                assert reply.json["header"] == "x-key"
                assert "connection" not in reply.headers  # a client error, not broken framing
        # a header the handler does not read may hold any bytes; presence is fine to test
        assert get(c, "/ignore", b"caf\xe9").json == {"ok": True}
        assert get(c, "/read?other", b"caf\xe9").json == {
            "value": None, "via_method": None, "present": False}
        assert c.request("/read?host").json["value"] == "test"


def test_repeated_headers_join_and_keep_their_text(make_server):
    server = make(make_server)
    with Client(server.address) as c:
        c.send("GET /read?x-key HTTP/1.1\r\nHost: t\r\nX-Key: á\r\nX-Key: ü\r\n\r\n".encode())
        assert c.read_response().json["value"] == "á, ü"
        c.send(b"GET /read?x-key HTTP/1.1\r\nHost: t\r\nX-Key: \xc3\xa1\r\nX-Key: \xfc\r\n\r\n")
        assert c.read_response().json["error"] == "invalid_header"
