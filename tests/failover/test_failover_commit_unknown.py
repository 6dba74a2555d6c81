"""A write whose COMMIT reaches PostgreSQL but whose answer never comes back (the connection
drops in between): the node cannot know it is stored and answers 503, yet the row is there.
Followers of the stream must still get its event, even when it becomes visible together with
later ones."""

from __future__ import annotations

import socket
import threading
import time

from sqlalchemy import create_engine, text

from support import ChatUser, EventFollower, HeldNotify, NodeProcess, require_pg
from tapped_relay import TappedRelay


class CommitEater(TappedRelay):
    """A TCP relay to PostgreSQL. Once armed, the next COMMIT sent on a connection that inserted
    an event row is forwarded, and the connection is then dropped before its answer."""

    upstream_timeout = 5.0

    def __init__(self, target_port: int = 5432) -> None:
        super().__init__(target_port)
        self.armed = threading.Event()
        self._lock = threading.Lock()

    def _eat(self, data: bytes, wrote_event: bool) -> bool:
        if not (wrote_event and b"COMMIT" in data and self.armed.is_set()):
            return False
        with self._lock:
            if self.eaten.is_set():
                return False
            self.eaten.set()
            return True

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        wrote_event = False
        for s, data in self.chunks(client, upstream):
            if s is not client:
                client.sendall(data)
                continue
            wrote_event = wrote_event or b"INSERT INTO events" in data
            upstream.sendall(data)
            if self._eat(data, wrote_event):
                time.sleep(0.2)  # let the server commit, then lose its answer
                return
            if b"COMMIT" in data or b"ROLLBACK" in data:
                wrote_event = False


def test_an_event_whose_commit_answer_was_lost_still_reaches_followers(tmp_path):
    """Regression: the hub counted such a position as abandoned. A follower parked below it
    was sent back to the database at once, but when the position became visible only later
    (an earlier write still in flight), together with a later event, the follower got the
    later one from the hub and its cursor passed the stored event: never delivered."""
    require_pg()
    import dbutil

    url = dbutil.create_pg_database()
    relay = CommitEater()
    relayed = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    assert relayed != url
    node = NodeProcess({"DATABASE_URL": relayed, "IS_ACTIVE": "true", "PEER_URL": "",
                        "ADMIN_TOKEN": "admin-secret"}, tmp_path, "node")
    engine = create_engine(url)
    first = None
    try:
        node.start()
        node.wait_active()
        ana = ChatUser(node.url, "ana")
        gid = ana("POST", "/groups", {"name": "lost answers"}).json["id"]
        cursor = ana("GET", "/events").json["cursor"]

        # An earlier write held in flight: a row takes its position's key first.
        first = HeldNotify(engine, node.url, ana, gid, "first")
        held = first.position

        follower = EventFollower(ana, cursor).start()
        time.sleep(0.3)  # parked below every new position

        relay.armed.set()
        lost = ana("POST", f"/notify/{gid}", {"message": "answer lost"})
        assert relay.eaten.is_set()
        assert lost.status == 503, lost.raw
        later = ana("POST", f"/notify/{gid}", {"message": "later"})
        assert later.status == 200 and later.json["eventId"] == held + 2, later.raw
        time.sleep(0.3)
        first_reply = first.release()  # the first write goes on and commits
        assert first_reply.status == 200 and first_reply.json["eventId"] == held
        time.sleep(2.5)
        received = follower.stop()

        with engine.connect() as conn:
            stored = [row[0] for row in conn.execute(text(
                "SELECT position FROM events WHERE position > :c AND group_id = :g "
                "ORDER BY position"), {"c": cursor, "g": gid})]
        assert stored == [held, held + 1, held + 2]  # the 503 one is stored too
        assert [e["id"] for e in received] == stored
    finally:
        if first is not None:
            first.release()
        node.stop()
        relay.close()
        engine.dispose()
        dbutil.drop_pg_database(url)
