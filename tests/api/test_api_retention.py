"""Events older than the retention window are pruned; a cursor from before them gets 410."""

from __future__ import annotations

import time

from support import ChatUser, NodeProcess


def test_cursor_older_than_retention_is_410(tmp_path):
    node = NodeProcess({"DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}", "IS_ACTIVE": "true",
                        "PEER_URL": "", "EVENT_RETENTION_SECONDS": "1"}, tmp_path, "retention")
    node.start()
    try:
        node.wait_active()
        ana = ChatUser(node.url, "ana")
        gid = ana("POST", "/groups", {"name": "old"}).json["id"]
        old_cursor = ana("GET", "/events").json["cursor"]
        ana("POST", "/messages", {"groupId": gid, "content": "soon forgotten"})
        deadline = time.monotonic() + 10
        reply = None
        while time.monotonic() < deadline:
            reply = ana("GET", f"/events?since={old_cursor}&timeout=0")
            if reply.status == 410:
                break
            time.sleep(0.2)
        assert reply is not None and reply.status == 410, reply.raw
        assert reply.json["error"] == "cursor_expired"
        assert "GET /messages" in reply.json["message"]
        # a fresh cursor works, and history is still there
        fresh = ana("GET", "/events").json["cursor"]
        assert ana("GET", f"/events?since={fresh}&timeout=0").status == 200
        assert len(ana("GET", "/messages", {"groupId": gid}).json["messages"]) == 1
    finally:
        node.stop()
