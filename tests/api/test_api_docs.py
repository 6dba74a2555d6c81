"""docs/API.md and docs/CLIENTS.md say what the server does: every route is documented, the
event types listed are exactly those a node emits (seen on a real node's /events), and the
admin rule for /fall and /revive behind a proxy is the one the node applies."""

from __future__ import annotations

import re

from support import REPO, ChatUser, NodeProcess, call

API_MD = (REPO / "docs" / "API.md").read_text()
CLIENTS_MD = (REPO / "docs" / "CLIENTS.md").read_text()


def _normal(path: str) -> str:
    """`/groups/{id}/members`, `/notify/{groupId}`, `/events?since=...` -> comparable form."""
    path = path.split("?", 1)[0]
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_every_route_is_documented():
    routes = set(re.findall(r'r\.add\("([A-Z]+)", "([^"]+)"',
                            (REPO / "src" / "hachat" / "api" / "routes.py").read_text()))
    assert len(routes) > 15
    documented = {(method, _normal(path))
                  for method, path in re.findall(r"^\| ([A-Z]+) \| `([^`]+)`", API_MD, re.M)}
    missing = sorted(f"{m} {p}" for m, p in routes if (m, _normal(p)) not in documented)
    assert missing == [], f"routes missing from docs/API.md: {missing}"


def _documented_event_types() -> set[str]:
    section = API_MD[API_MD.index("An event:"):]
    section = section[section.index("Types:"):]
    section = section[:section.index("\n\n")] if "\n\n" in section else section
    return set(re.findall(r"`([a-z]+\.[a-z]+)`", section))


def test_documented_event_types_are_the_ones_a_node_emits(api_node, unique):
    ana = ChatUser(api_node.url, unique("ana"))
    bea = ChatUser(api_node.url, unique("bea"))
    cid = ChatUser(api_node.url, unique("cid"))
    cursor = ana("GET", "/events").json["cursor"]
    gid = ana("POST", "/groups", {"name": "docs", "memberIds": [bea.id]}).json["id"]
    assert ana("POST", f"/groups/{gid}/members", {"userId": cid.id}).status == 200
    assert ana("DELETE", f"/groups/{gid}/members", {"userId": cid.id}).status == 200
    mid = ana("POST", "/messages", {"groupId": gid, "content": "hello"}).json["id"]
    assert ana("DELETE", "/messages", {"messageId": mid}).status == 200
    assert ana("POST", f"/notify/{gid}", {"message": "look"}).status == 200
    seen: list[dict] = []
    while not any(e["type"] == "group.notify" for e in seen):
        reply = ana("GET", f"/events?since={cursor}&timeout=5")
        assert reply.status == 200 and (reply.json["events"] or seen), reply.raw
        seen += reply.json["events"]
        cursor = reply.json["cursor"]
    assert {e["type"] for e in seen} == _documented_event_types()
    for event in seen:
        if event["type"].startswith("member."):
            assert set(event["data"]) == {"groupId", "groupName", "userId", "username", "by"}
            assert event["userId"] == event["data"]["userId"]


def test_fall_through_a_proxy_needs_the_admin_token(tmp_path):
    """Without ADMIN_TOKEN only direct loopback clients may /fall: a request carrying the
    X-Forwarded-For header HAProxy adds is refused even from loopback."""
    node = NodeProcess({"DATABASE_URL": f"sqlite:///{tmp_path / 'adm.db'}", "PEER_URL": "",
                        "ADMIN_TOKEN": ""}, tmp_path, name="no-token")
    node.start()
    try:
        node.wait_active()
        proxied = call(node.url, "POST", "/fall", headers={"X-Forwarded-For": "127.0.0.1"})
        assert proxied.status == 403 and "ADMIN_TOKEN" in proxied.json["message"]
        assert call(node.url, "GET", "/health").json["active"] is True
        assert call(node.url, "POST", "/fall").status == 200  # direct loopback
        assert call(node.url, "POST", "/revive").status == 200
    finally:
        node.stop()
    # ... and docs/CLIENTS.md says so: through HAProxy, /fall and /revive need ADMIN_TOKEN.
    haproxy_part = CLIENTS_MD[CLIENTS_MD.index("## HAProxy"):]
    sentence = haproxy_part[haproxy_part.index("`POST /fall`"):]
    sentence = sentence[:sentence.index("\n\n")] if "\n\n" in sentence else sentence
    assert "ADMIN_TOKEN" in sentence and "403" in sentence, sentence


def test_admin_routes_refuse_requests_a_web_page_made(tmp_path):
    """Regression: without ADMIN_TOKEN any loopback client may /fall, and that includes a
    browser on the node's machine running some web page's script: a cross-site POST (a form,
    or fetch in no-cors mode) reached /fall with the peer address 127.0.0.1 and took the node
    down; DNS rebinding did the same same-origin, and could read /stats. A browser marks what
    a page sends with `Origin` (every POST) and `Sec-Fetch-Site`: such requests are refused.
    Only the top-level navigation a person types (`Sec-Fetch-Site: none`) still passes."""
    node = NodeProcess({"DATABASE_URL": f"sqlite:///{tmp_path / 'csrf.db'}", "PEER_URL": "",
                        "ADMIN_TOKEN": ""}, tmp_path, name="no-token-csrf")
    node.start()
    try:
        node.wait_active()
        page_made = [{"Origin": "https://evil.example", "Content-Type": "text/plain"},
                     {"Origin": "null"},
                     {"Origin": node.url, "Sec-Fetch-Site": "same-origin"},
                     {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
                     {"Sec-Fetch-Site": "same-site"}]
        for headers in page_made:
            for method, path in (("POST", "/fall"), ("POST", "/revive"), ("GET", "/stats")):
                reply = call(node.url, method, path, headers=headers)
                assert reply.status == 403, (path, headers, reply.raw)
                assert reply.json["error"] == "forbidden" and "ADMIN_TOKEN" in reply.json["message"]
        assert call(node.url, "GET", "/health").json["active"] is True
        typed = call(node.url, "GET", "/stats", headers={"Sec-Fetch-Site": "none"})
        assert typed.status == 200, typed.raw
        assert call(node.url, "POST", "/fall").status == 200  # curl, a script: direct loopback
        assert call(node.url, "POST", "/revive").status == 200
    finally:
        node.stop()
