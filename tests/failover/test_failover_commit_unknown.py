"""A write whose COMMIT reaches PostgreSQL but whose answer never comes back (the connection
drops in between): the node cannot know it is stored and answers 503, yet the row is there.
Followers of the stream must still get its event, even when it becomes visible together with
later ones."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

from sqlalchemy import create_engine, text

from support import ChatUser, NodeProcess, call, require_pg


class CommitEater:
    """A TCP relay to PostgreSQL. Once armed, the next COMMIT sent on a connection that inserted
    an event row is forwarded, and the connection is then dropped before its answer."""

    def __init__(self, target_port: int = 5432) -> None:
        self.target = ("127.0.0.1", target_port)
        self.armed = threading.Event()
        self.eaten = threading.Event()
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _eat(self, data: bytes, wrote_event: bool) -> bool:
        if not (wrote_event and b"COMMIT" in data and self.armed.is_set()):
            return False
        with self._lock:
            if self.eaten.is_set():
                return False
            self.eaten.set()
            return True

    def _pump(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        wrote_event = False
        try:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 30)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client:
                        wrote_event = wrote_event or b"INSERT INTO events" in data
                        upstream.sendall(data)
                        if self._eat(data, wrote_event):
                            time.sleep(0.2)  # let the server commit, then lose its answer
                            return
                        if b"COMMIT" in data or b"ROLLBACK" in data:
                            wrote_event = False
                    else:
                        client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()


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
    try:
        node.start()
        node.wait_active()
        ana = ChatUser(node.url, "ana")
        gid = ana("POST", "/groups", {"name": "lost answers"}).json["id"]
        cursor = ana("GET", "/events").json["cursor"]

        def next_position() -> int:
            return call(node.url, "GET", "/stats", token="admin-secret").json["hub"][
                "next_position"]

        # An earlier write held in flight: a row takes its position's key first.
        held = next_position()
        blocker = engine.connect()
        blocker.execute(text("INSERT INTO events (position, kind, payload, created_at, epoch) "
                             "VALUES (:p, 'test.hold', '{}', now(), 0)"), {"p": held})
        slow: dict = {}
        first = threading.Thread(target=lambda: slow.setdefault(
            "reply", ana("POST", f"/notify/{gid}", {"message": "first"})))
        first.start()
        deadline = time.monotonic() + 5
        while next_position() == held and time.monotonic() < deadline:
            time.sleep(0.01)

        received: list[dict] = []
        stop = threading.Event()

        def follow() -> None:
            since = cursor
            while not stop.is_set():
                reply = ana("GET", f"/events?since={since}&timeout=1", timeout=10)
                assert reply.status == 200, reply.raw
                received.extend(reply.json["events"])
                since = reply.json["cursor"]

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        time.sleep(0.3)  # parked below every new position

        relay.armed.set()
        lost = ana("POST", f"/notify/{gid}", {"message": "answer lost"})
        assert relay.eaten.is_set()
        assert lost.status == 503, lost.raw
        later = ana("POST", f"/notify/{gid}", {"message": "later"})
        assert later.status == 200 and later.json["eventId"] == held + 2, later.raw
        time.sleep(0.3)
        blocker.rollback()  # the first write goes on and commits
        blocker.close()
        first.join(10)
        assert slow["reply"].status == 200 and slow["reply"].json["eventId"] == held
        time.sleep(2.5)
        stop.set()
        follower.join(10)

        with engine.connect() as conn:
            stored = [row[0] for row in conn.execute(text(
                "SELECT position FROM events WHERE position > :c AND group_id = :g "
                "ORDER BY position"), {"c": cursor, "g": gid})]
        assert stored == [held, held + 1, held + 2]  # the 503 one is stored too
        assert [e["id"] for e in received] == stored
    finally:
        node.stop()
        relay.close()
        engine.dispose()
        dbutil.drop_pg_database(url)
