"""hachat.client.HachatClient against a real pair of nodes (A active, B passive): every call,
its answers and its errors, and how it finds the active node."""

from __future__ import annotations

import threading

import pytest

from hachat.client import ClientError, HachatClient

PASSWORD = "password123"


def _client(pair, *, first=None, **kw) -> HachatClient:
    urls = [pair.a.url, pair.b.url] if first is None else [first.url, pair.a.url, pair.b.url]
    return HachatClient(urls, max_retry_time=kw.pop("max_retry_time", 15.0), **kw)


def test_login_groups_members(pair):
    ana, bea = _client(pair), _client(pair)
    first = ana.login("ana", PASSWORD)
    assert first["created"] is True and first["username"] == "ana"
    assert ana.token == first["token"] and ana.user_id == first["userId"]
    assert bea.login("bea", PASSWORD)["created"] is True
    again = HachatClient([pair.a.url, pair.b.url]).login("ana", PASSWORD)
    assert again["created"] is False and again["userId"] == ana.user_id

    with pytest.raises(ClientError) as bad:
        HachatClient(pair.a.url).login("ana", "wrong password")
    assert bad.value.status == 401 and bad.value.code == "invalid_credentials"

    group = ana.create_group("friends")
    assert group["name"] == "friends" and group["memberIds"] == [ana.user_id]
    assert [c["id"] for c in ana.chats()["chats"]] == [group["id"]]
    assert bea.chats()["chats"] == []
    with pytest.raises(ClientError) as outsider:
        bea.messages(group["id"])
    assert outsider.value.status == 403 and outsider.value.code == "forbidden"

    added = ana.add_member(group["id"], username="bea")
    assert added == {**added, "groupId": group["id"], "userId": bea.user_id, "added": True}
    assert ana.add_member(group["id"], user_id=bea.user_id)["added"] is False
    users = ana.group_users(group["id"])["users"]
    assert sorted(u["username"] for u in users) == ["ana", "bea"]
    assert [c["id"] for c in bea.chats()["chats"]] == [group["id"]]
    with pytest.raises(ClientError) as nobody:
        ana.add_member(group["id"], username="nobody")
    assert nobody.value.status == 404 and nobody.value.code == "not_found"
    with pytest.raises(ValueError):
        ana.add_member(group["id"])

    assert bea.remove_member(group["id"], bea.user_id)["removed"] is True
    assert bea.chats()["chats"] == []
    assert ana.logout() == {"status": "logged_out"} and ana.token is None


def test_post_list_delete_and_events(pair):
    ana, bea = _client(pair), _client(pair)
    ana.login("ana", PASSWORD)
    bea.login("bea", PASSWORD)
    gid = ana.create_group("talk", member_ids=[bea.user_id])["id"]
    start = bea.events()["cursor"]
    assert bea.cursor == start

    posted = [ana.post_message(gid, f"message {i}") for i in range(7)]
    assert [m["content"] for m in posted] == [f"message {i}" for i in range(7)]
    assert all(m["username"] == "ana" and m["groupId"] == gid for m in posted)
    assert len({m["clientMessageId"] for m in posted}) == 7

    page = bea.messages(gid, limit=3)
    assert [m["id"] for m in page["messages"]] == [m["id"] for m in reversed(posted[-3:])]
    older = bea.messages(gid, before=page["nextBefore"], limit=3)
    assert [m["id"] for m in older["messages"]] == [m["id"] for m in reversed(posted[1:4])]
    assert [m["id"] for m in bea.all_messages(gid, page_size=2)] == [m["id"] for m in posted]

    # the same client id twice: the second answer is the stored message, stored once
    once = ana.post_message(gid, "only once", client_message_id="fixed-id-1")
    twice = ana.post_message(gid, "only once", client_message_id="fixed-id-1")
    assert twice["id"] == once["id"]
    with pytest.raises(ClientError) as conflict:
        ana.post_message(gid, "something else", client_message_id="fixed-id-1")
    assert conflict.value.status == 409

    with pytest.raises(ClientError) as not_author:
        bea.delete_message(posted[0]["id"])
    assert not_author.value.status == 403
    assert ana.delete_message(posted[0]["id"]) == {"deleted": posted[0]["id"]}
    with pytest.raises(ClientError) as gone:
        ana.delete_message(posted[0]["id"])
    assert gone.value.status == 404
    with pytest.raises(ClientError) as blank:
        ana.post_message(gid, "   ")
    assert blank.value.status == 422 and blank.value.code == "invalid_field"
    assert ana.notify(gid, {"typing": True})["status"] == "notified"

    events: list[dict] = []
    cursor = start
    while not any(e["type"] == "group.notify" for e in events):
        page = bea.events(since=cursor, timeout=2)
        assert page["events"] or page["cursor"] == cursor
        events.extend(page["events"])
        cursor = page["cursor"]
    assert [e["id"] for e in events] == sorted({e["id"] for e in events})
    created = [e["data"] for e in events if e["type"] == "message.created"]
    assert [m["id"] for m in created] == [m["id"] for m in posted] + [once["id"]]
    assert created[0]["content"] is None and created[0]["deleted"] is True  # redacted
    assert [m["content"] for m in created[1:]] == [m["content"] for m in posted[1:]] + ["only once"]
    assert [e["data"]["id"] for e in events if e["type"] == "message.deleted"] == [posted[0]["id"]]
    assert events[-1]["data"] == {"message": {"typing": True}, "from": ana.user_id}
    assert bea.cursor == cursor


def test_follow_yields_live_events_in_order_and_stops(pair, wait_for):
    ana, bea = _client(pair), _client(pair)
    ana.login("ana", PASSWORD)
    bea.login("bea", PASSWORD)
    gid = ana.create_group("live", member_ids=[bea.user_id])["id"]
    got: list[dict] = []
    stop = threading.Event()
    follower = bea.clone()
    since = follower.events()["cursor"]

    def run() -> None:
        for event in follower.follow(since=since, timeout=1, stop=stop):
            got.append(event)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    posted = [ana.post_message(gid, f"live {i}")["id"] for i in range(20)]
    wait_for(lambda: len(got) >= 20, 10, "20 live events")
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert [e["data"]["id"] for e in got] == posted
    assert [e["id"] for e in got] == sorted({e["id"] for e in got})


def test_finds_the_active_node_whichever_is_listed_first(pair):
    c = HachatClient([pair.b.url, pair.a.url])
    assert c.active_url == pair.b.url
    c.login("cid", PASSWORD)  # B answers 503 not_active naming A: followed at once
    assert c.active_url == pair.a.url
    assert c.health(pair.b.url)["active"] is False
    other = HachatClient(f"{pair.b.url}, {pair.a.url}")
    assert other.find_active(max_wait=5) == pair.a.url and other.active_url == pair.a.url

    # fall/revive act on one node (admin token): the client then follows B
    assert c.fall(pair.a.url, admin_token="admin-secret")["active"] is False
    gid = c.create_group("moved")["id"]  # retried until B holds the lease
    assert c.active_url == pair.b.url
    assert c.revive(pair.a.url, admin_token="admin-secret")["status"] == "alive"
    assert c.messages(gid)["messages"] == []


def test_gives_up_with_unreachable_when_no_node_answers(pair):
    pair.a.kill()
    pair.b.kill()
    c = HachatClient([pair.a.url, pair.b.url], max_retry_time=0.5)
    with pytest.raises(ClientError) as err:
        c.login("zed", PASSWORD)
    assert err.value.status is None and err.value.code == "unreachable"


def test_message_ids_are_never_reused(pair):
    """Deleting the newest message must not free its id (SQLite reused it before
    AUTOINCREMENT, and the browser page then hid the new message as deleted)."""
    c = HachatClient([pair.a.url, pair.b.url])
    c.login("ana", PASSWORD)
    gid = c.create_group("ids")["id"]
    first = c.post_message(gid, "first")
    c.delete_message(first["id"])
    second = c.post_message(gid, "second")
    assert second["id"] != first["id"]
