"""deploy/haproxy.cfg in front of a real pair: a client that knows only HAProxy's address
carries on through a kill -9 of the active node."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time
import uuid

import pytest
from harness import Ack, check_no_loss_no_dup_no_split, stored_messages

from hachat.client import ClientError, HachatClient
from support import call
from tapped_relay import TappedRelay

PASSWORD = "password123"
_REQUEST_LINE = re.compile(rb"[A-Z]+ /\S* HTTP/1\.[01]\r\n")


def test_haproxy_sends_everything_to_the_active_node(pair, haproxy):
    root = call(haproxy.url, "GET", "/")
    assert root.status == 200 and root.json["active"] is True and root.json["node"] == "node-a"
    page = call(haproxy.url, "GET", "/", headers={"Accept": "text/html"})
    assert page.status == 200 and b'id="login-form"' in page.raw
    assert call(haproxy.url, "GET", "/static/app.js").status == 200
    assert {haproxy.node_behind() for _ in range(10)} == {"node-a"}
    c = HachatClient(haproxy.url)
    c.login("ana", PASSWORD)
    gid = c.create_group("via-lb")["id"]
    assert c.post_message(gid, "hello")["epoch"] == 1
    assert [m["content"] for m in c.messages(gid)["messages"]] == ["hello"]
    # /fall through the proxy needs the token (ADMIN_TOKEN is set) and is not retried
    assert call(haproxy.url, "POST", "/fall").status == 403
    fell = call(haproxy.url, "POST", "/fall", token="admin-secret")
    assert fell.status == 200 and fell.json["node"] == "node-a" and fell.json["active"] is False
    haproxy.wait_routes_to("node-b", timeout=10)
    assert c.post_message(gid, "after fall")["epoch"] == 2
    assert c.active_url == haproxy.url


def test_client_through_haproxy_carries_on_after_kill_9(pair, haproxy, wait_for):
    writer = HachatClient(haproxy.url, max_retry_time=20)
    writer.login("ana", PASSWORD)
    reader = HachatClient(haproxy.url, max_retry_time=20)
    reader.login("bea", PASSWORD)
    gid = writer.create_group("lb", member_ids=[reader.user_id])["id"]

    acks: list[Ack] = []
    errors: list[Exception] = []
    seen: list[dict] = []
    stop_writing, stop_following = threading.Event(), threading.Event()

    def write() -> None:
        n = 0
        while not stop_writing.is_set():
            n += 1
            key = f"lb-{uuid.uuid4()}"
            try:
                m = writer.post_message(gid, f"msg {n}", client_message_id=key)
            except ClientError as exc:
                errors.append(exc)
                return
            acks.append(Ack(key, m["id"], m["epoch"], haproxy.url, time.monotonic()))
            time.sleep(0.01)

    def follow(since: int) -> None:
        try:
            for event in reader.follow(since=since, timeout=2, stop=stop_following):
                seen.append(event)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, daemon=True),
               threading.Thread(target=follow, args=(reader.events()["cursor"],), daemon=True)]
    for t in threads:
        t.start()

    def created() -> list[int]:
        return [e["data"]["id"] for e in seen if e["type"] == "message.created"]

    wait_for(lambda: len(acks) >= 20 and len(created()) >= 10, 10, "traffic before the kill")
    pair.a.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    before = len(acks)
    wait_for(lambda: errors or len(acks) > before, 10, "a write acknowledged after the kill")
    assert not errors, errors
    resumed_after = acks[before].at - killed_at
    print(f"haproxy: writes acknowledged again {resumed_after:.2f}s after the kill")
    assert resumed_after < 6.0, f"writes resumed only {resumed_after:.1f}s after the kill"
    wait_for(lambda: errors or len(acks) >= before + 20, 10, "writes flowing after the kill")
    stop_writing.set()
    threads[0].join(30)
    assert not errors, errors
    assert haproxy.node_behind() == "node-b"

    acked = [a.message_id for a in acks]
    wait_for(lambda: errors or set(acked) <= set(created()), 15, "every message followed")
    stop_following.set()
    threads[1].join(10)
    assert not errors, errors
    event_ids = [e["id"] for e in seen]
    assert event_ids == sorted(set(event_ids)), "an event repeated or out of order"
    assert created() == acked
    stored = stored_messages(haproxy.url, writer.token, gid)
    check_no_loss_no_dup_no_split(acks, stored)
    assert [m["id"] for m in stored] == acked
    assert {a.epoch for a in acks} == {1, 2}
    assert writer.urls == reader.urls == [haproxy.url]  # only ever HAProxy's address


def test_haproxy_answers_json_503_when_no_node_is_ready(pair, haproxy, wait_for):
    pair.a.kill()
    pair.b.kill()

    def refused():
        reply = call(haproxy.url, "GET", "/chats", timeout=5)
        return reply if reply.status == 503 else None

    reply = wait_for(refused, 10, "a 503 from HAProxy")
    assert reply.json["error"] == "not_active" and reply.headers["retry-after"] == "1"
    assert reply.headers["content-type"].startswith("application/json")
    c = HachatClient(haproxy.url, max_retry_time=1.0)
    with pytest.raises(ClientError) as err:
        c.login("zed", PASSWORD)
    assert err.value.status == 503 and err.value.code == "not_active"


class PostAnswerEater(TappedRelay):
    """A TCP relay in front of a node that, once, swallows the node's answer to a
    `POST /messages` and closes the connection (HAProxy sees an empty response after the write
    was carried out). Everything else is relayed both ways."""

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        posting = False
        for s, data in self.chunks(client, upstream):
            if s is client:
                if _REQUEST_LINE.match(data):  # a request head, not a body
                    posting = data.startswith(b"POST /messages ")
                upstream.sendall(data)
            elif posting and not self.eaten.is_set():
                self.eaten.set()
                return  # the answer is lost: close both sides
            else:
                client.sendall(data)


@pytest.mark.parametrize("fresh_db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("keyed", [True, False], ids=["with-key", "without-key"])
def test_haproxy_never_stores_a_post_twice_after_a_lost_answer(pair, make_haproxy, keyed):
    """A node carries out POST /messages but its answer is lost (empty response). HAProxy may
    send the request again only when it carries an Idempotency-Key (the node then answers with
    the message already stored); without one, a resend would store it twice, so the client gets
    the error (502, or its keep-alive connection closed) and decides. Whether HAProxy resends
    varies from request to request, so this tries ten times, on new and reused connections."""
    eater = PostAnswerEater(pair.ports[0])
    try:
        lb = make_haproxy(pair, HACHAT_NODE_A=eater.address)
        c = HachatClient(lb.url)
        c.login("ana", PASSWORD)
        outcomes = []
        for attempt in range(10):
            gid = c.create_group(f"retry {attempt}")["id"]
            eater.eaten.clear()
            conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
            try:
                if attempt % 2:  # a reused (keep-alive) connection
                    conn.request("GET", "/health")
                    assert conn.getresponse().read()
                headers = {"Authorization": f"Bearer {c.token}",
                           "Content-Type": "application/json"}
                if keyed:
                    headers["Idempotency-Key"] = f"lb-key-{attempt}"
                conn.request("POST", "/messages", headers=headers,
                             body=json.dumps({"groupId": gid, "content": "once"}).encode())
                try:
                    resp = conn.getresponse()
                    status, answer = resp.status, json.loads(resp.read())
                except http.client.RemoteDisconnected:  # closed without an answer
                    status, answer = None, {}
            finally:
                conn.close()
            assert eater.eaten.is_set()
            stored = stored_messages(lb.url, c.token, gid)
            outcomes.append((status, len(stored)))
            assert [m["content"] for m in stored] == ["once"], outcomes
            if status == 200:  # resent: the node answered with the message it had stored
                assert keyed and answer["id"] == stored[0]["id"], (outcomes, answer)
            else:
                assert status in (None, 502), (outcomes, answer)
    finally:
        eater.close()
