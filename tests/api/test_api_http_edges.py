"""Where the HTTP layer meets the API, end to end on a real node: half-closed clients and
header text."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import uuid
from urllib.parse import urlsplit

from support import ChatUser, call


def raw_exchange(base: str, method: str, path: str, body: dict, headers: dict[str, str]
                 ) -> list[tuple[int, dict[str, str], bytes]]:
    """Send one request, half-close (`shutdown(SHUT_WR)`), read every response until the
    server closes: [(status, headers, body)], interim ones included."""
    parts = urlsplit(base)
    data = json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", f"Host: {parts.hostname}",
            "Content-Type: application/json", f"Content-Length: {len(data)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        sock.shutdown(socket.SHUT_WR)
        stream = b""
        while chunk := sock.recv(65536):
            stream += chunk
    replies = []
    while stream:
        raw_head, _, rest = stream.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields = {k.strip().lower(): v.strip()
                  for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(fields.get("content-length", "0")) if status >= 200 else 0
        replies.append((status, fields, rest[:length]))
        stream = rest[length:]
    return replies


def test_a_half_closed_client_gets_its_message_answer(api_node, unique):
    """Regression: after `shutdown(SHUT_WR)` a POST /messages got no answer, though the
    message was sometimes stored (the FIN cancelled the request being committed)."""
    ana = ChatUser(api_node.url, unique("half"))
    gid = ana("POST", "/groups", {"name": "half"}).json["id"]
    key = str(uuid.uuid4())
    replies = raw_exchange(api_node.url, "POST", "/messages",
                           {"groupId": gid, "content": "sent, then FIN"},
                           {"Authorization": f"Bearer {ana.token}", "Idempotency-Key": key})
    finals = [r for r in replies if r[0] >= 200]
    assert [r[0] for r in finals] == [201], replies
    assert finals[0][1]["connection"] == "close"
    message = json.loads(finals[0][2])
    stored = ana("GET", "/messages", {"groupId": gid}).json["messages"]
    assert [m["id"] for m in stored] == [message["id"]]


def test_a_half_closed_client_gets_its_login_answer(api_node, unique):
    name = unique("halflog")
    replies = raw_exchange(api_node.url, "POST", "/login",
                           {"username": name, "password": "password123"}, {})
    finals = [r for r in replies if r[0] >= 200]
    assert [r[0] for r in finals] == [201], replies
    token = json.loads(finals[0][2])["token"]
    assert call(api_node.url, "GET", "/chats", token=token).status == 200


def post_with_raw_header(base: str, token: str, body: dict, key: bytes,
                         extra: dict[str, bytes] | None = None) -> tuple[int, dict]:
    """POST /messages with an Idempotency-Key header of exactly these bytes."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", "/messages", body=json.dumps(body).encode(),
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/json", "Idempotency-Key": key,
                              **(extra or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_utf8_idempotency_key_is_the_same_key_as_in_the_body(api_node, unique):
    """Regression: header values were read as Latin-1, so a non-ASCII key in the header
    (UTF-8 bytes, as curl sends it) differed from the same key as `clientMessageId`."""
    ana = ChatUser(api_node.url, unique("utf8"))
    gid = ana("POST", "/groups", {"name": "utf8"}).json["id"]
    key = f"ключ-é-{uuid.uuid4()}"
    body = {"groupId": gid, "content": "once", "clientMessageId": key}
    status, first = post_with_raw_header(api_node.url, ana.token, body, key.encode())
    assert status == 201, first
    # the body alone, then the header alone: the same key, the same message
    again = ana("POST", "/messages", body)
    assert again.status == 200 and again.json["id"] == first["id"]
    status, third = post_with_raw_header(api_node.url, ana.token,
                                         {"groupId": gid, "content": "once"}, key.encode())
    assert status == 200 and third["id"] == first["id"]
    assert len(ana("GET", "/messages", {"groupId": gid}).json["messages"]) == 1


def test_an_idempotency_key_that_is_not_utf8_is_refused(api_node, unique):
    ana = ChatUser(api_node.url, unique("latin"))
    gid = ana("POST", "/groups", {"name": "latin"}).json["id"]
    status, reply = post_with_raw_header(api_node.url, ana.token,
                                         {"groupId": gid, "content": "x"}, b"cl\xe9")
    assert status == 400 and reply["error"] == "invalid_header", reply
    assert reply["header"] == "idempotency-key"
    assert ana("GET", "/messages", {"groupId": gid}).json["messages"] == []
    # a header the route does not read may hold anything
    status, reply = post_with_raw_header(api_node.url, ana.token,
                                         {"groupId": gid, "content": "y"}, b"ok",
                                         {"X-Note": b"caf\xe9"})
    assert status == 201, reply


# A body of many small arrays: the costliest JSON to parse per byte.
_HEAVY_BODY = b'{"timeout": 0, "x": [' + b",".join([b"[]"] * 300_000) + b"]}"


def test_loop_routes_refuse_big_bodies_before_parsing_them(api_node):
    """Regression: /login and /subscribe/status are answered on the loop thread, and parsed
    any body up to MAX_BODY_BYTES there: 1 MiB of `[[],[],...]` took ~0.1 s of the one
    thread every connection waits on, unauthenticated and (for /subscribe/status) without a
    rate limit, so a handful of such clients made /health take 0.2-0.7 s. These routes need
    a few hundred bytes: a body over 16 KiB is 413 body_too_large, not parsed."""
    heavy = _HEAVY_BODY[:20_000] + b"]}"
    for path in ("/subscribe/status?timeout=0", "/login", "/", "/health", "/ready"):
        method = "POST" if path == "/login" else "GET"
        reply = call(api_node.url, method, path, heavy)
        assert reply.status == 413, (path, reply.raw)
        assert reply.json["error"] == "body_too_large" and "16384" in reply.json["message"]
    # a body the route needs still passes, and one just under the bound too
    assert call(api_node.url, "GET", "/subscribe/status", {"timeout": 0}).status == 200
    padded = {"timeout": 0, "pad": "x" * (16 * 1024 - 40)}
    assert call(api_node.url, "GET", "/subscribe/status", padded).status == 200


def test_chat_routes_refuse_bodies_far_beyond_any_they_need(api_node):
    """Regression: worker routes took bodies up to 1 MiB. Parsing one holds the GIL for
    ~0.1 s, which stalls the loop thread as surely as parsing on it, and tokens are free
    (POST /login creates the account). The biggest body a route needs is a 4,000-character
    message with every character escaped (~48 KB), or a /notify message of 16 KiB escaped
    (~50 KB): bodies over MAX_BODY_BYTES (128 KiB) are refused unread."""
    user = ChatUser(api_node.url, f"bulky_{uuid.uuid4().hex[:10]}")
    gid = user("POST", "/groups", {"name": "bulky"}).json["id"]
    for method, path in (("POST", "/messages"), ("GET", "/messages"), ("POST", "/groups"),
                         ("POST", f"/notify/{gid}")):
        reply = user(method, path, _HEAVY_BODY)
        assert reply.status == 413, (path, reply.raw)
        assert reply.json["error"] == "body_too_large"
    # the biggest bodies the routes accept still pass
    content = "\U0001f600" * 4000
    escaped = json.dumps({"groupId": gid, "content": content}).encode()  # ensure_ascii
    assert len(escaped) > 48_000
    posted = user("POST", "/messages", escaped)
    assert posted.status == 201 and posted.json["content"] == content, posted.raw[:200]
    message = "\u00e9" * (8 * 1024 - 2)  # 16 KiB encoded as the limit counts it
    escaped = json.dumps({"message": message}).encode()
    assert len(escaped) > 48_000
    assert user("POST", f"/notify/{gid}", escaped).status == 200


def test_big_bodies_do_not_stall_other_clients(api_node):
    """The same, as other clients see it: /health stays fast while several connections send
    1 MiB bodies to /subscribe/status (the loop) and to POST /messages (a worker)."""
    import threading
    import time

    token = ChatUser(api_node.url, f"flood_{uuid.uuid4().hex[:10]}").token
    parts = urlsplit(api_node.url)
    requests = [
        (b"GET /subscribe/status?timeout=0 HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
         b"\r\n\r\n" % len(_HEAVY_BODY)) + _HEAVY_BODY,
        (b"POST /messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
         b"Content-Length: %d\r\n\r\n" % (token.encode(), len(_HEAVY_BODY))) + _HEAVY_BODY,
    ]
    stop = threading.Event()

    def flood(request: bytes) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError), socket.create_connection(
                    (parts.hostname, parts.port), timeout=10) as sock:
                sock.sendall(request)
                sock.recv(4096)

    threads = [threading.Thread(target=flood, args=(requests[i % 2],), daemon=True)
               for i in range(6)]
    for thread in threads:
        thread.start()
    latencies = []
    try:
        time.sleep(0.3)
        for _ in range(30):
            start = time.perf_counter()
            assert call(api_node.url, "GET", "/health").status == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.03)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.03, latencies
