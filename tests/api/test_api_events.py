"""The durable event stream: long-poll wake-ups, cursors, ordering and exactly-once, privacy."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from sqlalchemy import create_engine

from support import ChatUser, EventFollower, HeldNotify, call


def _follow(user, cursor, want, deadline=20.0):
    """Read events from `cursor` until `want(events)` is true; returns (events, cursor)."""
    seen = []
    end = time.monotonic() + deadline
    while time.monotonic() < end and not want(seen):
        reply = user("GET", f"/events?since={cursor}&timeout=2", timeout=10)
        assert reply.status == 200, reply.raw
        seen.extend(reply.json["events"])
        cursor = reply.json["cursor"]
    return seen, cursor


def test_cursor_then_created_and_deleted(api_node, unique):
    ana, bea = ChatUser(api_node.url, unique("ea")), ChatUser(api_node.url, unique("eb"))
    gid = ana("POST", "/groups", {"name": "ev", "memberIds": [bea.id]}).json["id"]
    start = bea("GET", "/events").json
    assert start["events"] == [] and isinstance(start["cursor"], int)
    mid = ana("POST", "/messages", {"groupId": gid, "content": "hello"}).json["id"]
    ana("DELETE", "/messages", {"messageId": mid})
    events, _ = _follow(bea, start["cursor"], lambda ev: len(ev) >= 2)
    assert [e["type"] for e in events] == ["message.created", "message.deleted"]
    assert events[0]["data"]["id"] == mid and events[1]["data"] == {"id": mid, "groupId": gid}
    assert events[0]["id"] < events[1]["id"]
    # the deleted message's content is gone from the stream too
    replay = bea("GET", f"/events?since={start['cursor']}&timeout=0").json["events"]
    assert replay[0]["data"].get("content") in (None, "")


def test_deleting_a_message_leaves_notices_that_name_its_id_alone(api_node, unique):
    """Regression: a group.notify whose JSON was {"message": {"id": N, ...}} was tied to
    message N, so deleting N blanked the notice's content."""
    ana, bea = ChatUser(api_node.url, unique("nr")), ChatUser(api_node.url, unique("ns"))
    gid = ana("POST", "/groups", {"name": "nr", "memberIds": [bea.id]}).json["id"]
    start = bea("GET", "/events").json["cursor"]
    mid = ana("POST", "/messages", {"groupId": gid, "content": "to delete"}).json["id"]
    notice = {"id": mid, "content": "a notice that happens to name the id"}
    assert bea("POST", f"/notify/{gid}", {"message": notice}).status == 200
    assert ana("DELETE", "/messages", {"messageId": mid}).status == 200
    replay = bea("GET", f"/events?since={start}&timeout=0").json["events"]
    kinds = [e["type"] for e in replay]
    assert kinds == ["message.created", "group.notify", "message.deleted"], kinds
    assert replay[0]["data"]["content"] is None  # the message itself is redacted
    assert replay[1]["data"] == {"message": notice, "from": bea.id}


def test_waiting_poll_wakes_on_a_new_message(api_node, unique):
    ana, bea = ChatUser(api_node.url, unique("wa")), ChatUser(api_node.url, unique("wb"))
    gid = ana("POST", "/groups", {"name": "wake", "memberIds": [bea.id]}).json["id"]
    cursor = bea("GET", "/events").json["cursor"]
    threading.Timer(0.5, lambda: ana("POST", "/messages",
                                     {"groupId": gid, "content": "ping"})).start()
    started = time.monotonic()
    reply = bea("GET", f"/events?since={cursor}&timeout=20")
    elapsed = time.monotonic() - started
    assert reply.status == 200
    assert [e["data"]["content"] for e in reply.json["events"]] == ["ping"]
    assert 0.3 < elapsed < 5, elapsed


def test_timeout_is_honoured_with_the_same_cursor(api_node, unique):
    ana = ChatUser(api_node.url, unique("to"))
    ana("POST", "/groups", {"name": "quiet"})
    cursor = ana("GET", "/events").json["cursor"]
    started = time.monotonic()
    reply = ana("GET", f"/events?since={cursor}&timeout=1")
    elapsed = time.monotonic() - started
    assert reply.json == {"events": [], "cursor": cursor}
    assert 0.9 <= elapsed < 2.0, elapsed


def test_non_members_never_receive(api_node, unique):
    ana, eve = ChatUser(api_node.url, unique("pa")), ChatUser(api_node.url, unique("pe"))
    gid = ana("POST", "/groups", {"name": "private"}).json["id"]
    cursor = eve("GET", "/events").json["cursor"]
    ana("POST", "/messages", {"groupId": gid, "content": "secret"})
    ana("POST", f"/notify/{gid}", {"message": "psst"})
    reply = eve("GET", f"/events?since={cursor}&timeout=1").json
    assert reply["events"] == []


def test_removed_member_stops_seeing_the_group(api_node, unique):
    ana, bea = ChatUser(api_node.url, unique("ra")), ChatUser(api_node.url, unique("rb"))
    gid = ana("POST", "/groups", {"name": "rm", "memberIds": [bea.id]}).json["id"]
    cursor = bea("GET", "/events").json["cursor"]
    ana("DELETE", f"/groups/{gid}/members", {"userId": bea.id})
    ana("POST", "/messages", {"groupId": gid, "content": "after removal"})
    events, _ = _follow(bea, cursor, lambda ev: any(e["type"] == "member.removed" for e in ev),
                        deadline=5)
    types = [e["type"] for e in events]
    assert "member.removed" in types and "message.created" not in types
    again = bea("GET", f"/events?since={cursor}&timeout=0").json["events"]
    assert all(e["type"] != "message.created" for e in again)


def test_member_added_while_waiting_sees_the_group(api_node, unique):
    ana, bea = ChatUser(api_node.url, unique("ma")), ChatUser(api_node.url, unique("mb"))
    gid = ana("POST", "/groups", {"name": "join"}).json["id"]
    cursor = bea("GET", "/events").json["cursor"]
    result = {}

    def wait():
        result["events"], result["cursor"] = _follow(
            bea, cursor, lambda ev: any(e["type"] == "message.created" for e in ev), deadline=10)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    ana("POST", f"/groups/{gid}/members", {"userId": bea.id})
    ana("POST", "/messages", {"groupId": gid, "content": "welcome"})
    waiter.join(15)
    types = [e["type"] for e in result["events"]]
    assert types[-1] == "message.created" and "member.added" in types
    ids = [e["id"] for e in result["events"]]
    assert ids == sorted(set(ids))


def test_a_member_read_after_its_removal_still_gets_what_came_before_it(api_node, unique):
    """Regression: events were filtered by the membership at read time, so a client that
    resumed after being removed lost the group's events from while it was a member."""
    ana, bea = ChatUser(api_node.url, unique("la")), ChatUser(api_node.url, unique("lb"))
    gid = ana("POST", "/groups", {"name": "late", "memberIds": [bea.id]}).json["id"]
    cursor = bea("GET", "/events").json["cursor"]
    ana("POST", "/messages", {"groupId": gid, "content": "while a member"})
    ana("POST", f"/notify/{gid}", {"message": "still a member"})
    ana("DELETE", f"/groups/{gid}/members", {"userId": bea.id})
    ana("POST", "/messages", {"groupId": gid, "content": "after removal"})
    ana("POST", f"/notify/{gid}", {"message": "after removal"})
    events = bea("GET", f"/events?since={cursor}&timeout=0").json["events"]
    assert [e["type"] for e in events] == ["message.created", "group.notify", "member.removed"]
    assert events[0]["data"]["content"] == "while a member"


def test_a_member_added_later_gets_nothing_from_before_it_joined(api_node, unique):
    """Regression: a client resuming from a cursor older than its joining received the
    group's earlier events (a notice sent while it was not a member, for one)."""
    ana, bea = ChatUser(api_node.url, unique("ja")), ChatUser(api_node.url, unique("jb"))
    gid = ana("POST", "/groups", {"name": "before"}).json["id"]
    cursor = bea("GET", "/events").json["cursor"]
    ana("POST", "/messages", {"groupId": gid, "content": "before bea"})
    ana("POST", f"/notify/{gid}", {"message": "not for bea"})
    ana("POST", f"/groups/{gid}/members", {"userId": bea.id})
    ana("POST", "/messages", {"groupId": gid, "content": "welcome"})
    events = bea("GET", f"/events?since={cursor}&timeout=0").json["events"]
    assert [e["type"] for e in events] == ["member.added", "message.created"]
    assert events[1]["data"]["content"] == "welcome"
    # and a member removed then added again gets nothing from the time in between
    ana("DELETE", f"/groups/{gid}/members", {"userId": bea.id})
    ana("POST", "/messages", {"groupId": gid, "content": "while bea is out"})
    ana("POST", f"/groups/{gid}/members", {"userId": bea.id})
    ana("POST", "/messages", {"groupId": gid, "content": "bea is back"})
    events = bea("GET", f"/events?since={cursor}&timeout=0").json["events"]
    assert [e["type"] for e in events] == ["member.added", "message.created", "member.removed",
                                           "member.added", "message.created"]
    assert [e["data"]["content"] for e in events if e["type"] == "message.created"] == \
        ["welcome", "bea is back"]


def test_concurrent_writers_every_event_once_in_order(api_node, unique):
    writers = [ChatUser(api_node.url, unique(f"cw{i}")) for i in range(6)]
    reader = ChatUser(api_node.url, unique("cr"))
    gid = writers[0]("POST", "/groups", {
        "name": "busy", "memberIds": [w.id for w in writers[1:]] + [reader.id]}).json["id"]
    cursor = reader("GET", "/events").json["cursor"]
    per_writer = 25
    posted: list[int] = []
    lock = threading.Lock()

    def write(user):
        for i in range(per_writer):
            reply = user("POST", "/messages", {"groupId": gid, "content": f"{user.username}-{i}"})
            assert reply.status == 201
            with lock:
                posted.append(reply.json["id"])

    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    events, _ = _follow(reader, cursor,
                        lambda ev: sum(e["type"] == "message.created" for e in ev)
                        >= per_writer * len(writers), deadline=60)
    for t in threads:
        t.join()
    created = [e for e in events if e["type"] == "message.created"]
    positions = [e["id"] for e in events]
    assert positions == sorted(positions) and len(positions) == len(set(positions))
    assert sorted(e["data"]["id"] for e in created) == sorted(posted)
    # each writer's own messages arrive in the order it sent them
    for w in writers:
        mine = [e["data"]["content"] for e in created if e["data"]["userId"] == w.id]
        assert mine == [f"{w.username}-{i}" for i in range(per_writer)]


def test_resume_after_reconnect_loses_nothing(api_node, unique):
    ana, bea = ChatUser(api_node.url, unique("sa")), ChatUser(api_node.url, unique("sb"))
    gid = ana("POST", "/groups", {"name": "resume", "memberIds": [bea.id]}).json["id"]
    cursor = bea("GET", "/events").json["cursor"]
    for i in range(5):
        ana("POST", "/messages", {"groupId": gid, "content": f"while away {i}"})
    # a brand-new connection resumes from the old cursor
    events, cursor2 = _follow(bea, cursor, lambda ev: len(ev) >= 5)
    assert [e["data"]["content"] for e in events] == [f"while away {i}" for i in range(5)]
    assert bea("GET", f"/events?since={cursor2}&timeout=0").json["events"] == []


def test_cursor_ahead_of_the_stream_is_refused(api_node, unique):
    ana = ChatUser(api_node.url, unique("fc"))
    reply = ana("GET", "/events?since=999999999999&timeout=0")
    assert reply.status == 410


def test_disconnected_waiters_are_dropped(api_node, unique):
    ana = ChatUser(api_node.url, unique("dw"))
    ana("POST", "/groups", {"name": "dw"})
    cursor = ana("GET", "/events").json["cursor"]
    before = call(api_node.url, "GET", "/stats", token="admin-secret").json
    socks = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", api_node.port))
        s.sendall(f"GET /events?since={cursor}&timeout=30 HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {ana.token}\r\n\r\n".encode())
        socks.append(s)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = call(api_node.url, "GET", "/stats", token="admin-secret").json
        if stats["hub"]["waiters"] >= before["hub"]["waiters"] + 50:
            break
        time.sleep(0.05)
    assert stats["hub"]["waiters"] >= before["hub"]["waiters"] + 50
    for s in socks:
        s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = call(api_node.url, "GET", "/stats", token="admin-secret").json
        if stats["hub"]["waiters"] <= before["hub"]["waiters"]:
            break
        time.sleep(0.05)
    assert stats["hub"]["waiters"] <= before["hub"]["waiters"]


def test_logging_out_ends_the_tokens_waiting_polls_with_401(api_node, unique):
    """Regression: a long-poll parked before its token was logged out kept delivering the
    group's events after the logout. Logout must end that token's waiting polls, and only
    that token's: the same user's other session keeps waiting."""
    ana, bea = ChatUser(api_node.url, unique("lo")), ChatUser(api_node.url, unique("lp"))
    bea_phone = ChatUser(api_node.url, bea.username)  # a second session of the same user
    gid = ana("POST", "/groups", {"name": "lo", "memberIds": [bea.id]}).json["id"]
    cursor = bea("GET", "/events").json["cursor"]
    results: dict[str, object] = {}

    def poll(name, who):
        results[name] = who("GET", f"/events?since={cursor}&timeout=20", timeout=30)

    waiters = [threading.Thread(target=poll, args=(n, w))
               for n, w in (("laptop", bea), ("phone", bea_phone))]
    for t in waiters:
        t.start()
    time.sleep(0.5)  # both parked
    started = time.monotonic()
    assert bea("POST", "/logout").status == 200
    waiters[0].join(10)
    ended = results.get("laptop")
    assert ended is not None, "the logged-out session's poll was still waiting"
    assert ended.status == 401 and ended.json["error"] == "unauthorized", ended.raw
    assert time.monotonic() - started < 5
    # the message posted after the logout reaches the other session, not the ended one
    ana("POST", "/messages", {"groupId": gid, "content": "after logout"})
    waiters[1].join(10)
    phone = results["phone"]
    assert phone.status == 200
    assert [e["data"]["content"] for e in phone.json["events"]] == ["after logout"]
    assert bea("GET", f"/events?since={cursor}&timeout=0").status == 401


# PostgreSQL only: SQLite commits one write at a time, in position order.
@pytest.mark.parametrize("backend_url", ["postgres"], indirect=True)
def test_a_notify_event_id_is_a_cursor_while_an_earlier_write_is_still_in_flight(
        api_node, backend_url, unique):
    """Regression: on PostgreSQL writes commit concurrently, so `POST /notify` could answer an
    `eventId` above the visible horizon (an earlier position still in flight); a client that
    followed the stream from that id got `410 cursor_unknown` although the event was stored.
    The earlier write is held here by a row that takes its position's key first."""
    assert backend_url.startswith("postgresql")
    ana = ChatUser(api_node.url, unique("nf"))
    slow_gid = ana("POST", "/groups", {"name": "slow"}).json["id"]
    gid = ana("POST", "/groups", {"name": "fast"}).json["id"]
    engine = create_engine(backend_url)
    slow = HeldNotify(engine, api_node.url, ana, slow_gid, "slow")
    held = slow.position
    try:
        fast = ana("POST", f"/notify/{gid}", {"message": "fast"})
        assert fast.status == 200 and fast.json["eventId"] == held + 1, fast.raw
        cursor = fast.json["eventId"]
        at_once = ana("GET", f"/events?since={cursor}&timeout=0")
        assert at_once.status == 200, at_once.raw
        assert at_once.json == {"events": [], "cursor": cursor}
        parked: dict = {}
        poll = threading.Thread(target=lambda: parked.setdefault(
            "reply", ana("GET", f"/events?since={cursor}&timeout=5", timeout=15)))
        poll.start()
        time.sleep(0.3)
    finally:
        slow_reply = slow.release()
        engine.dispose()
    assert slow_reply.status == 200 and slow_reply.json["eventId"] == held
    later = ana("POST", f"/notify/{gid}", {"message": "later"}).json["eventId"]
    poll.join(10)
    reply = parked["reply"]
    assert reply.status == 200, reply.raw
    # From the notify's id on: the events after it only (the slow one is before it).
    assert [e["id"] for e in reply.json["events"]] == [later]


def test_an_event_delivered_live_is_the_event_replayed_later(api_node, unique):
    """Regression: the hub stamped an event's createdAt from one clock reading and the stored
    row from another, so about one event in a hundred (a millisecond boundary in between)
    read differently live and when replayed from the database (after a failover, or by a
    client resuming late): the same id, two createdAt values."""
    ana = ChatUser(api_node.url, unique("ts"))
    gid = ana("POST", "/groups", {"name": "stamps"}).json["id"]
    start = ana("GET", "/events").json["cursor"]
    follower = EventFollower(ana, start).start()
    time.sleep(0.2)
    for i in range(400):
        if i % 4 == 0:
            assert ana("POST", f"/notify/{gid}", {"message": i}).status == 200
        else:
            assert ana("POST", "/messages", {"groupId": gid, "content": f"m{i}"}).status == 201
    created = ana("POST", "/groups", {"name": "more", "memberIds": []}).json["id"]
    assert ana("POST", f"/groups/{created}/members", {"userId": ana.id}).status == 200
    time.sleep(1.5)
    live = follower.stop()
    replay, _ = _follow(ana, start, lambda ev: len(ev) >= len(live), deadline=10)
    assert len(live) == 401 and [e["id"] for e in replay] == [e["id"] for e in live]
    differ = [(a["id"], a["createdAt"], b["createdAt"]) for a, b in zip(live, replay, strict=True)
              if a != b]
    assert differ == []
