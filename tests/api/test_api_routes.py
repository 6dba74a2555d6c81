"""Each route's normal use against a real node on a real socket, on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import uuid

from support import ChatUser, call


def test_root_and_health(api_node):
    root = call(api_node.url, "GET", "/")
    assert root.status == 200 and root.json["service"] == "hachat"
    health = call(api_node.url, "GET", "/health").json
    assert health["status"] == "alive" and health["active"] is True
    assert {"node", "epoch", "peer"} <= set(health)
    assert call(api_node.url, "GET", "/ready").status == 200


def test_root_serves_the_page_to_browsers(api_node):
    reply = call(api_node.url, "GET", "/", headers={"Accept": "text/html,*/*"})
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/html")
    assert b"<html" in reply.raw.lower()
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
    assert reply.headers["x-content-type-options"] == "nosniff"


def test_login_creates_then_logs_in(api_node, unique):
    name = unique("ana")
    first = call(api_node.url, "POST", "/login", {"username": name, "password": "s3cret-pass"})
    assert first.status == 201 and first.json["created"] is True
    assert set(first.json) >= {"userId", "username", "token"}
    again = call(api_node.url, "POST", "/login",
                 {"username": name.upper(), "password": "s3cret-pass"})
    assert again.status == 200 and again.json["userId"] == first.json["userId"]
    assert again.json["username"] == name  # stored spelling, case-insensitive match
    assert again.json["token"] != first.json["token"]
    wrong = call(api_node.url, "POST", "/login", {"username": name, "password": "nope-nope"})
    assert wrong.status == 401 and wrong.json["error"] == "invalid_credentials"


def test_logout_revokes_the_token(api_node, unique):
    user = ChatUser(api_node.url, unique("lo"))
    assert user("GET", "/chats").status == 200
    assert user("POST", "/logout").status == 200
    reply = user("GET", "/chats")
    assert reply.status == 401 and reply.json["error"] == "unauthorized"


def test_logout_holds_while_other_requests_use_the_token(api_node, unique):
    """Requests in flight with the token while it is revoked must not bring it back."""
    import threading

    for _round in range(3):
        user = ChatUser(api_node.url, unique("lr"))
        stop = threading.Event()

        def hammer(user=user, stop=stop):
            while not stop.is_set():
                user("GET", "/chats")

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(hammer) for _ in range(4)]
            assert user("POST", "/logout").status == 200
            stop.set()
            for f in busy:
                f.result()
        for _ in range(3):
            reply = user("GET", "/chats")
            assert reply.status == 401 and reply.json["error"] == "unauthorized"


def test_group_messages_walk(api_node, unique):
    ana, bea, cid = ChatUser(api_node.url, unique("ana")), ChatUser(api_node.url, unique("bea")), \
        ChatUser(api_node.url, unique("cid"))
    created = ana("POST", "/groups", {"name": "friends", "memberIds": [bea.id]})
    assert created.status == 201, created.raw
    gid = created.json["id"]
    assert sorted(created.json["memberIds"]) == sorted([ana.id, bea.id])

    chats = bea("GET", "/chats").json["chats"]
    assert [c["id"] for c in chats if c["id"] == gid] == [gid]

    users = ana("GET", "/group-users", {"groupId": gid}).json["users"]
    assert {u["username"] for u in users} == {ana.username, bea.username}
    # query-string form, as a browser sends it
    assert ana("GET", f"/group-users?groupId={gid}").json["users"] == users

    posted = ana("POST", "/messages", {"groupId": gid, "content": "Olá!", "userId": ana.id})
    assert posted.status == 201
    msg = posted.json
    assert msg["content"] == "Olá!" and msg["userId"] == ana.id and msg["groupId"] == gid
    assert msg["createdAt"].endswith("Z") and msg["username"] == ana.username

    listed = bea("GET", "/messages", {"groupId": gid}).json
    assert [m["id"] for m in listed["messages"]] == [msg["id"]]

    # outsiders see nothing and can't post
    assert cid("GET", "/messages", {"groupId": gid}).status == 403
    assert cid("POST", "/messages", {"groupId": gid, "content": "hi"}).status == 403
    assert cid("GET", "/group-users", {"groupId": gid}).status == 403
    # only the author deletes
    assert bea("DELETE", "/messages", {"messageId": msg["id"]}).status == 403
    deleted = ana("DELETE", "/messages", {"messageId": msg["id"]})
    assert deleted.status == 200 and deleted.json == {"deleted": msg["id"]}
    assert ana("GET", "/messages", {"groupId": gid}).json["messages"] == []
    assert ana("DELETE", "/messages", {"messageId": msg["id"]}).status == 404


def test_members_added_and_removed(api_node, unique):
    ana, bea, cid = (ChatUser(api_node.url, unique(p)) for p in ("ana", "bea", "cid"))
    gid = ana("POST", "/groups", {"name": "team"}).json["id"]
    added = ana("POST", f"/groups/{gid}/members", {"username": bea.username.upper()})
    assert added.status == 200 and added.json["added"] is True and added.json["userId"] == bea.id
    assert ana("POST", f"/groups/{gid}/members", {"userId": bea.id}).json["added"] is False
    # a non-member can't add people; bea (member, not creator) can't remove ana
    assert cid("POST", f"/groups/{gid}/members", {"userId": cid.id}).status == 403
    assert bea("DELETE", f"/groups/{gid}/members", {"userId": ana.id}).status == 403
    # but may leave
    assert bea("DELETE", f"/groups/{gid}/members", {"userId": bea.id}).status == 200
    assert bea("GET", "/messages", {"groupId": gid}).status == 403
    assert ana("POST", f"/groups/{gid}/members", {"username": "no_such_user_x"}).status == 404


def test_pagination_newest_first(api_node, unique):
    ana = ChatUser(api_node.url, unique("pg"))
    gid = ana("POST", "/groups", {"name": "log"}).json["id"]
    ids = [ana("POST", "/messages", {"groupId": gid, "content": f"m{i}"}).json["id"]
           for i in range(7)]
    page1 = ana("GET", f"/messages?groupId={gid}&limit=3").json
    assert [m["id"] for m in page1["messages"]] == ids[::-1][:3]
    page2 = ana("GET", f"/messages?groupId={gid}&limit=3&before={page1['nextBefore']}").json
    assert [m["id"] for m in page2["messages"]] == ids[::-1][3:6]
    page3 = ana("GET", "/messages", {"groupId": gid, "limit": 3,
                                     "before": page2["nextBefore"]}).json
    assert [m["id"] for m in page3["messages"]] == ids[:1]
    assert page3["nextBefore"] is None


def test_idempotency_key_stores_once(api_node, unique):
    ana = ChatUser(api_node.url, unique("idem"))
    gid = ana("POST", "/groups", {"name": "idem"}).json["id"]
    key = str(uuid.uuid4())

    def post(_):
        return ana("POST", "/messages", {"groupId": gid, "content": "once"},
                   headers={"Idempotency-Key": key})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(post, range(8)))
    assert sorted(r.status for r in replies).count(201) == 1
    assert all(r.status in (200, 201) for r in replies)
    assert len({r.json["id"] for r in replies}) == 1
    body_key = ana("POST", "/messages", {"groupId": gid, "content": "once",
                                         "clientMessageId": key})
    assert body_key.status == 200 and body_key.json["id"] == replies[0].json["id"]
    assert len(ana("GET", "/messages", {"groupId": gid}).json["messages"]) == 1
    clash = ana("POST", "/messages", {"groupId": gid, "content": "other"},
                headers={"Idempotency-Key": key})
    assert clash.status == 409


def test_a_retry_after_the_message_was_deleted_does_not_store_it_again(api_node, unique):
    ana = ChatUser(api_node.url, unique("tomb"))
    gid = ana("POST", "/groups", {"name": "tomb"}).json["id"]
    key = str(uuid.uuid4())
    first = ana("POST", "/messages", {"groupId": gid, "content": "regret"},
                headers={"Idempotency-Key": key})
    assert first.status == 201
    assert ana("DELETE", "/messages", {"messageId": first.json["id"]}).status == 200
    cursor = ana("GET", "/events").json["cursor"]
    for body, headers in (({"groupId": gid, "content": "regret"}, {"Idempotency-Key": key}),
                          ({"groupId": gid, "content": "regret", "clientMessageId": key}, {}),
                          ({"groupId": gid, "content": "changed"}, {"Idempotency-Key": key})):
        late = ana("POST", "/messages", body, headers=headers)
        assert late.status == 410, late.raw
        assert late.json["error"] == "message_deleted"
        assert late.json["messageId"] == first.json["id"]
    assert ana("GET", "/messages", {"groupId": gid}).json["messages"] == []
    assert ana("GET", "/events", {"since": cursor, "timeout": 0}).json["events"] == []
    # The key is spent for this author only.
    assert ana("POST", "/messages", {"groupId": gid, "content": "new"},
               headers={"Idempotency-Key": key + "-2"}).status == 201


def test_a_retry_after_leaving_the_group_gets_the_first_answer(api_node, unique):
    """Regression: a retry whose message was stored answered 403 once its author had left
    the group; the idempotency key is looked up before membership is judged."""
    ana, bea = ChatUser(api_node.url, unique("rl")), ChatUser(api_node.url, unique("rm"))
    gid = bea("POST", "/groups", {"name": "leave", "memberIds": [ana.id]}).json["id"]
    kept_key, gone_key = str(uuid.uuid4()), str(uuid.uuid4())
    kept = ana("POST", "/messages", {"groupId": gid, "content": "kept"},
               headers={"Idempotency-Key": kept_key})
    gone = ana("POST", "/messages", {"groupId": gid, "content": "gone",
                                     "clientMessageId": gone_key})
    assert kept.status == 201 and gone.status == 201
    assert ana("DELETE", "/messages", {"messageId": gone.json["id"]}).status == 200
    assert ana("DELETE", f"/groups/{gid}/members", {"userId": ana.id}).status == 200

    again = ana("POST", "/messages", {"groupId": gid, "content": "kept"},
                headers={"Idempotency-Key": kept_key})
    assert again.status == 200, again.raw
    assert again.json == kept.json
    again = ana("POST", "/messages", {"groupId": gid, "content": "kept",
                                      "clientMessageId": kept_key})
    assert again.status == 200 and again.json["id"] == kept.json["id"]
    late = ana("POST", "/messages", {"groupId": gid, "content": "gone",
                                     "clientMessageId": gone_key})
    assert late.status == 410 and late.json["error"] == "message_deleted", late.raw
    assert late.json["messageId"] == gone.json["id"]
    # a new message (or one without a key) from a former member is still refused
    for headers in ({"Idempotency-Key": str(uuid.uuid4())}, {}):
        assert ana("POST", "/messages", {"groupId": gid, "content": "new"},
                   headers=headers).status == 403
    assert [m["id"] for m in bea("GET", "/messages", {"groupId": gid}).json["messages"]] == [
        kept.json["id"]]


def test_notify_reaches_the_group_stream(api_node, unique):
    ana, bea = ChatUser(api_node.url, unique("na")), ChatUser(api_node.url, unique("nb"))
    gid = ana("POST", "/groups", {"name": "n", "memberIds": [bea.id]}).json["id"]
    cursor = bea("GET", "/events").json["cursor"]
    sent = ana("POST", f"/notify/{gid}", {"message": {"typing": True}})
    assert sent.status == 200 and sent.json["status"] == "notified"
    got = bea("GET", f"/events?since={cursor}&timeout=5").json
    kinds = [(e["type"], e["data"]) for e in got["events"]]
    assert ("group.notify", {"message": {"typing": True}, "from": ana.id}) in kinds
    # the admin token may notify any group; an outsider may not
    admin = call(api_node.url, "POST", f"/notify/{gid}", {"message": "maintenance"},
                 token="admin-secret")
    assert admin.status == 200
    outsider = ChatUser(api_node.url, unique("no"))
    assert outsider("POST", f"/notify/{gid}", {"message": "x"}).status == 403


def test_subscribe_status_times_out_with_state(api_node):
    reply = call(api_node.url, "GET", "/subscribe/status?timeout=0.2")
    assert reply.status == 200
    assert reply.json["status"] == "alive" and reply.json["changed"] is False
    old = reply.json["version"]
    assert call(api_node.url, "GET", f"/subscribe/status?since={old - 1}").json["changed"] is True


def test_ids_are_never_reused_after_a_delete(api_node, unique):
    """Regression: on SQLite, deleting the newest message freed its id for the next one, so
    a client that remembered the deleted id hid the new message."""
    ana = ChatUser(api_node.url, unique("ids"))
    gid = ana("POST", "/groups", {"name": "ids"}).json["id"]
    first = ana("POST", "/messages", {"groupId": gid, "content": "first"}).json["id"]
    assert ana("DELETE", "/messages", {"messageId": first}).status == 200
    second = ana("POST", "/messages", {"groupId": gid, "content": "second"}).json["id"]
    assert second > first
