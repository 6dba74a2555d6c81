"""Regression: a flood of logins (each an argon2 hash) stalled every chat route for seconds
and took ~64 MiB per hash. Logins are rate-limited per address and hashing is bounded."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

from support import ChatUser, NodeProcess, call


def test_login_attempts_are_rate_limited_per_address(tmp_path):
    node = NodeProcess({"DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}", "PEER_URL": "",
                        "LOGIN_RATE": "0.5", "LOGIN_BURST": "3"}, tmp_path, "limit").start()
    try:
        node.wait_active()
        statuses = [call(node.url, "POST", "/login", {"username": "x"}).status for _ in range(5)]
        assert statuses[:3] == [422, 422, 422]
        limited = call(node.url, "POST", "/login", {"username": "x"})
        assert limited.status == 429 and limited.json["error"] == "too_many_requests"
        assert int(limited.headers["retry-after"]) >= 1
        # another address (as told by a local proxy) has its own budget
        other = call(node.url, "POST", "/login", {"username": "x"},
                     headers={"X-Forwarded-For": "203.0.113.9"})
        assert other.status == 422
    finally:
        node.stop()


def _login_with_headers(node: NodeProcess, header_lines: list[str]) -> int:
    """POST /login with raw header lines (so a header may be repeated); the status."""
    body = json.dumps({"username": "x"}).encode()
    head = ["POST /login HTTP/1.1", f"Host: 127.0.0.1:{node.port}",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            "Connection: close", *header_lines]
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_a_client_rotating_x_forwarded_for_is_still_limited(tmp_path):
    """Regression: the limit keyed on the first X-Forwarded-For value, which the client writes
    (HAProxy's `option forwardfor` adds its own value after it), so a client sending a new
    value each time was never limited."""
    node = NodeProcess({"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "PEER_URL": "",
                        "LOGIN_RATE": "0.1", "LOGIN_BURST": "3"}, tmp_path, "xff").start()
    try:
        node.wait_active()
        client = "203.0.113.50"  # what the proxy saw
        forms = [
            # the proxy appended to the client's header...
            lambda i: [f"X-Forwarded-For: 198.51.100.{i}, {client}"],
            # ...or added a header of its own after the client's
            lambda i: [f"X-Forwarded-For: 198.51.100.{i}", f"X-Forwarded-For: {client}"],
        ]
        statuses = [_login_with_headers(node, forms[i % 2](i)) for i in range(6)]
        assert statuses[:3] == [422, 422, 422]
        assert statuses[3:] == [429, 429, 429]
        # the same proxy forwarding another client: a budget of its own
        assert _login_with_headers(node, ["X-Forwarded-For: 203.0.113.51"]) == 422
    finally:
        node.stop()


def test_chat_stays_responsive_during_a_login_flood(tmp_path):
    node = NodeProcess({"DATABASE_URL": f"sqlite:///{tmp_path / 'f.db'}", "PEER_URL": ""},
                       tmp_path, "flood").start()
    try:
        node.wait_active()
        ana = ChatUser(node.url, "ana")
        ana("POST", "/groups", {"name": "g"})
        # 12 accounts, 10 wrong passwords each: every one is hashed (10 is the per-account
        # budget of failures, see the test below)
        for i in range(12):
            ChatUser(node.url, f"target{i}")

        def wrong_login(i):
            return call(node.url, "POST", "/login",
                        {"username": f"target{i % 12}", "password": f"wrong-password-{i}"},
                        headers={"X-Forwarded-For": f"198.51.100.{i % 50}"}, timeout=30).status

        with concurrent.futures.ThreadPoolExecutor(60) as pool:
            flood = [pool.submit(wrong_login, i) for i in range(120)]
            time.sleep(0.3)
            started = time.monotonic()
            chats = ana("GET", "/chats", timeout=30)
            elapsed = time.monotonic() - started
            statuses = {f.result() for f in flood}
        assert chats.status == 200
        assert elapsed < 3.0, f"GET /chats took {elapsed:.1f}s during the flood"
        assert statuses <= {401, 503}
    finally:
        node.stop()


def test_password_guessing_is_limited_per_account_across_addresses(tmp_path):
    """Regression: only each address was limited (20 a second), so guesses at one account's
    password from many addresses (or through a proxy, many X-Forwarded-For values) ran at the
    login lane's full speed, ~3 million a day. After 10 wrong passwords for a username, its
    logins wait (429, Retry-After) until its budget refills, one attempt per 6 s, whatever the
    address; other accounts and new ones are not held up."""
    node = NodeProcess({"DATABASE_URL": f"sqlite:///{tmp_path / 'g.db'}", "PEER_URL": ""},
                       tmp_path, "guess").start()
    try:
        node.wait_active()
        victim = ChatUser(node.url, "victim", "the right password")
        bystander = ChatUser(node.url, "bystander", "another password")
        for i in range(10):
            wrong = call(node.url, "POST", "/login",
                         {"username": "VICTIM", "password": f"guess no {i}"},
                         headers={"X-Forwarded-For": f"203.0.113.{i}"})
            assert wrong.status == 401, wrong.raw
        for password in ("guess no 10", "the right password"):
            held = call(node.url, "POST", "/login", {"username": "victim", "password": password},
                        headers={"X-Forwarded-For": "198.51.100.7"})
            assert held.status == 429 and held.json["error"] == "too_many_requests", held.raw
            assert "username" in held.json["message"]
            assert int(held.headers["retry-after"]) >= 1
        # the victim's live token still works; other accounts log in as usual
        assert victim("GET", "/chats").status == 200
        again = call(node.url, "POST", "/login",
                     {"username": "bystander", "password": "another password"})
        assert again.status == 200, again.raw
        assert bystander("GET", "/chats").status == 200
        created = call(node.url, "POST", "/login", {"username": "newcomer", "password": "12345678"})
        assert created.status == 201, created.raw
        # a successful login spends nothing
        for _ in range(12):
            assert call(node.url, "POST", "/login",
                        {"username": "bystander", "password": "another password"}).status == 200
    finally:
        node.stop()


def test_addresses_of_one_ipv6_network_share_one_login_budget(tmp_path):
    """Regression: the limit keyed on the whole address, and an IPv6 host is given a /64 (2^64
    addresses to rotate through), so a client changing the last bits each time was never
    limited. IPv6 addresses count per /64 (IPv4-mapped ones as IPv4)."""
    node = NodeProcess({"DATABASE_URL": f"sqlite:///{tmp_path / 'v6.db'}", "PEER_URL": "",
                        "LOGIN_RATE": "0.1", "LOGIN_BURST": "3"}, tmp_path, "v6").start()
    try:
        node.wait_active()
        statuses = [_login_with_headers(node, [f"X-Forwarded-For: 2001:db8:1:2::{i:x}"])
                    for i in range(1, 7)]
        assert statuses[:3] == [422, 422, 422]
        assert statuses[3:] == [429, 429, 429], statuses
        # another /64 has a budget of its own
        assert _login_with_headers(node, ["X-Forwarded-For: 2001:db8:1:3::1"]) == 422
        # an IPv4-mapped address is its IPv4 address
        mapped = [_login_with_headers(node, [f"X-Forwarded-For: {form}"])
                  for form in ("203.0.113.77", "::ffff:203.0.113.77", "203.0.113.77",
                               "::ffff:cb00:714d")]
        assert mapped == [422, 422, 422, 429], mapped
    finally:
        node.stop()
