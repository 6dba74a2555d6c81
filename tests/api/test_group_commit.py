"""Group commit of `POST /messages`: messages queued together are written in one transaction,
and each request still gets exactly the answer it would have got alone.

An in-process node on a fresh database of each kind, driven over real HTTP. To make a batch
deterministic the test holds the write path (SQLite's write lock, PostgreSQL's write gate)
while requests queue up behind the committer.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from hachat.api.group_commit import _Queued
from hachat.app import HachatNode
from hachat.cluster.roles import Role
from hachat.http.messages import Deferred
from hachat.settings import load_settings
from hachat.store import chat
from hachat.store.lease import GATE
from support import ChatUser, fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
def node(request, tmp_path: Path):
    with fresh_database(request.param, tmp_path) as url:
        settings = load_settings({"DATABASE_URL": url, "PORT": "0", "IS_ACTIVE": "true",
                                  "PEER_URL": "", "NODE_ID": "group-commit",
                                  "LOG_LEVEL": "WARNING",
                                  # Writes are held for a moment below: long enough for
                                  # requests to queue, never near the lease's term.
                                  "LEASE_TTL": "30", "LEASE_RENEW_INTERVAL": "2"},
                                 dotenv=False, base_dir=tmp_path)
        app = HachatNode(settings)
        _, port = app.start()
        thread = threading.Thread(target=app.serve_forever, daemon=True)
        thread.start()
        assert app.node.wait_for_role(Role.ACTIVE, timeout=10)
        app.url = f"http://127.0.0.1:{port}"
        try:
            yield app
        finally:
            app.stop()
            thread.join(10)


@contextmanager
def writes_held(app: HachatNode):
    """Block every write transaction of `app` until the block ends."""
    with app.db.write() as session:
        session.connection()  # SQLite: BEGIN IMMEDIATE on the only write connection
        if app.db.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                            {"ns": GATE[0], "key": GATE[1]})
        yield


def wait_until(predicate, timeout: float = 3.0) -> None:
    """Poll; the timeout stays under the store's lock timeout (5 s) that a held write hits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def pending(app: HachatNode) -> tuple[int, int]:
    stats = app.committer.stats()
    return stats["queued"], stats["writing"]


def test_one_batch_answers_each_request_as_if_alone(node):
    ana = ChatUser(node.url, "gc_ana")
    ben = ChatUser(node.url, "gc_ben")
    cat = ChatUser(node.url, "gc_cat")
    gid = ana("POST", "/groups", {"name": "gc", "memberIds": [ben.id]}).json["id"]
    cursor = ana("GET", "/events").json["cursor"]
    requests = [(ana, {"groupId": gid, "content": f"a{i}"}) for i in range(12)]
    requests += [(ben, {"groupId": gid, "content": f"b{i}", "clientMessageId": f"b{i}"})
                 for i in range(6)]
    requests += [(ana, {"groupId": gid, "content": "same", "clientMessageId": "dup"})] * 2
    requests += [(ana, {"groupId": gid, "content": "other", "clientMessageId": "dup"})]
    requests += [(cat, {"groupId": gid, "content": "intruder"}),
                 (ana, {"groupId": 9_000_000, "content": "nowhere"})]
    replies: list = [None] * len(requests)

    def post(i: int) -> None:
        user, body = requests[i]
        replies[i] = user("POST", "/messages", body, timeout=30)

    before = node.committer.stats()
    with writes_held(node):
        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        # All queued behind the held write (one batch may have been taken and be blocked).
        wait_until(lambda: sum(pending(node)) == len(requests))
    for t in threads:
        t.join(30)
    after = node.committer.stats()
    assert after["messages"] - before["messages"] == len(requests)
    assert after["batches"] - before["batches"] <= 2  # one blocked batch, then the rest

    statuses = [r.status for r in replies]
    assert statuses[:18] == [201] * 18, [r.raw for r in replies[:18]]
    dup = replies[18:21]
    assert Counter(r.status for r in dup)[201] == 1
    winner = next(r for r in dup if r.status == 201).json
    for r, (_, body) in zip(dup, requests[18:21], strict=True):
        if r.status == 201:
            continue
        if body["content"] == winner["content"]:
            assert r.status == 200 and r.json["id"] == winner["id"]
        else:
            assert r.status == 409 and r.json["messageId"] == winner["id"]
    assert replies[21].status == 403 and replies[21].json["error"] == "forbidden"
    assert replies[22].status == 404 and replies[22].json["resource"] == "group"

    created = [r.json for r in replies if r.status == 201]
    stored = ana("GET", "/messages", {"groupId": gid, "limit": 200}).json["messages"]
    assert sorted(m["id"] for m in stored) == sorted(m["id"] for m in created)
    assert len({m["id"] for m in created}) == len(created)
    for m in created:
        assert m["username"] in ("gc_ana", "gc_ben") and m["groupId"] == gid
    events = ana("GET", "/events", {"since": cursor, "timeout": 0}).json["events"]
    delivered = [e["data"]["id"] for e in events if e["type"] == "message.created"]
    assert delivered == sorted(m["id"] for m in created)  # once each, in commit order


# PostgreSQL only: it refuses NUL in text at insert time, a fault met inside the transaction.
@pytest.mark.parametrize("node", ["postgres"], indirect=True)
def test_a_message_that_breaks_the_transaction_does_not_sink_its_batch(node):
    ana = ChatUser(node.url, "gc_solo")
    gid = ana("POST", "/groups", {"name": "solo"}).json["id"]
    drafts = [chat.MessageDraft(ana.id, gid, "before"),
              # The API refuses NUL; here it stands for any fault met inside the transaction.
              chat.MessageDraft(ana.id, gid, "nul \x00 inside"),
              chat.MessageDraft(ana.id, gid, "after")]
    items = [_Queued(d, ana.username, Deferred(30, lambda: None)) for d in drafts]
    node.committer._commit(items)
    answers = [item.deferred._early for item in items]
    assert [a.status for a in answers] == [201, 500, 201]
    stored = ana("GET", "/messages", {"groupId": gid}).json["messages"]
    assert [m["content"] for m in stored] == ["after", "before"]


def test_requests_queued_at_shutdown_are_written_and_answered(node):
    ana = ChatUser(node.url, "gc_late")
    gid = ana("POST", "/groups", {"name": "late"}).json["id"]
    replies: list = []
    with writes_held(node):
        threads = [threading.Thread(target=lambda i=i: replies.append(
            ana("POST", "/messages", {"groupId": gid, "content": f"m{i}"}, timeout=30)))
            for i in range(5)]
        for t in threads:
            t.start()
        wait_until(lambda: sum(pending(node)) == 5)
        stopper = threading.Thread(target=node.stop)
        stopper.start()
        time.sleep(0.3)  # the shutdown has begun while the writes wait
    stopper.join(30)
    for t in threads:
        t.join(30)
    # Stopping hands the lease over first, so queued messages may be refused as "not active";
    # but every 201 must be stored, and no request may be left without an answer.
    assert len(replies) == 5
    assert all(r.status in (201, 503) for r in replies), [r.raw for r in replies]
    created = {r.json["id"] for r in replies if r.status == 201}
    with node.db.read() as s:
        stored = {m.id for m in chat.list_messages(s, gid)}
    assert stored == created
