"""hachat.client.HachatClient through a kill -9 of the active node: it follows the new active
node, a retried post is stored once, and follow() yields every event once, in order."""

from __future__ import annotations

import signal
import socket
import time
import uuid

import pytest
from harness import Ack, check_no_loss_no_dup_no_split, stored_messages

from hachat.client import ClientError, HachatClient
from support import BackgroundLoop
from tapped_relay import TappedRelay

PASSWORD = "password123"


class PostingLoop(BackgroundLoop):
    """Posts "msg n" in a thread with its own client, recording each acknowledgement."""

    join_timeout = 30.0

    def __init__(self, client: HachatClient, group_id: int) -> None:
        super().__init__()
        self.client = client
        self.group_id = group_id
        self.acks: list[Ack] = []
        self.errors: list[Exception] = []

    def stop(self) -> list[Ack]:
        self.halt()
        return self.acks

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            key = f"loop-{uuid.uuid4()}"
            try:
                m = self.client.post_message(self.group_id, f"msg {n}", client_message_id=key)
            except ClientError as exc:  # gave up: recorded, the test fails on it
                self.errors.append(exc)
                return
            self.acks.append(Ack(key, m["id"], m["epoch"], self.client.active_url,
                                 time.monotonic()))
            time.sleep(0.01)


class Following(BackgroundLoop):
    """follow() in a thread, collecting every event it yields."""

    def __init__(self, client: HachatClient, since: int) -> None:
        super().__init__()
        self.client = client
        self.since = since
        self.events: list[dict] = []
        self.error: BaseException | None = None

    def stop(self) -> list[dict]:
        self.halt()  # the current long-poll (timeout 1 s) ends first
        return self.events

    def run(self) -> None:
        try:
            for event in self.client.follow(since=self.since, timeout=1, stop=self.stopping):
                self.events.append(event)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def created_ids(self) -> list[int]:
        return [e["data"]["id"] for e in self.events if e["type"] == "message.created"]


def test_kill_9_mid_stream_nothing_lost_nothing_twice(pair, wait_for):
    ana = HachatClient([pair.a.url, pair.b.url], max_retry_time=20)
    ana.login("ana", PASSWORD)
    bea = HachatClient([pair.a.url, pair.b.url], max_retry_time=20)
    bea.login("bea", PASSWORD)
    gid = ana.create_group("ha", member_ids=[bea.user_id])["id"]
    follower = Following(bea.clone(), since=bea.events()["cursor"]).start()
    poster = PostingLoop(ana.clone(), gid).start()

    wait_for(lambda: len(poster.acks) >= 20 and len(follower.created_ids()) >= 10, 10,
             "messages flowing before the kill")
    pair.a.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    before = len(poster.acks)
    wait_for(lambda: poster.errors or len(poster.acks) >= before + 20, 20,
             "acknowledged writes after the kill")
    acks = poster.stop()
    assert not poster.errors, poster.errors
    first_after = min(a.at for a in acks[before:])
    print(f"client: writes acknowledged again {first_after - killed_at:.2f}s after the kill")
    assert first_after - killed_at < 8.0, "writes did not resume within a few seconds"
    assert pair.wait_one_active(exclude=pair.a) is pair.b
    assert poster.client.active_url == pair.b.url

    acked_ids = [a.message_id for a in acks]
    wait_for(lambda: follower.error or set(acked_ids) <= set(follower.created_ids()), 15,
             "the follower to see every acknowledged message")
    events = follower.stop()
    assert follower.error is None, follower.error
    assert follower.client.active_url == pair.b.url
    event_ids = [e["id"] for e in events]
    assert event_ids == sorted(set(event_ids)), "an event repeated or out of order"
    assert follower.created_ids() == acked_ids  # every message, once, in the order acknowledged
    stored = stored_messages(pair.b.url, ana.token, gid)
    check_no_loss_no_dup_no_split(acks, stored)
    assert [m["id"] for m in stored] == acked_ids
    assert len({a.epoch for a in acks}) == 2


class AnswerEater(TappedRelay):
    """A TCP relay to a node that forwards the request but never the answer: when the node's
    answer arrives it calls `on_answer` (e.g. kill -9 the node), then drops the connection. It
    does this once; later connections are relayed both ways."""

    def __init__(self, target_port: int, on_answer) -> None:
        super().__init__(target_port, backlog=16)
        self.on_answer = on_answer

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        for s, data in self.chunks(client, upstream, idle=5):
            if s is upstream and not self.eaten.is_set():
                self.eaten.set()
                self.on_answer()
                return
            (upstream if s is client else client).sendall(data)


@pytest.mark.parametrize("kill_active", [True, False], ids=["active-killed", "active-alive"])
def test_post_retried_after_a_lost_answer_is_stored_once(pair, kill_active):
    """The write commits on A, its answer never reaches the client (and A dies, or not): the
    client retries with the same clientMessageId on the node now active, which answers with the
    message already stored."""
    ana = HachatClient([pair.a.url, pair.b.url])
    ana.login("ana", PASSWORD)
    gid = ana.create_group("once")["id"]
    eater = AnswerEater(pair.ports[0],
                        (lambda: pair.a.signal(signal.SIGKILL)) if kill_active else (lambda: None))
    try:
        client = HachatClient([eater.url, pair.b.url], token=ana.token, max_retry_time=20)
        message = client.post_message(gid, "exactly once", client_message_id="lost-answer-1")
    finally:
        eater.close()
    assert eater.eaten.is_set()
    active = pair.wait_one_active(exclude=pair.a if kill_active else None)
    assert active is (pair.b if kill_active else pair.a)
    assert client.active_url == active.url  # named by B's not_active answer, or B itself
    stored = stored_messages(active.url, ana.token, gid)
    assert [(m["id"], m["content"], m["clientMessageId"]) for m in stored] == \
        [(message["id"], "exactly once", "lost-answer-1")]
    if kill_active:  # stored by A before it died, under A's epoch; found again on B
        assert message["epoch"] == 1 and pair.b.wait_health()["epoch"] == 2
