"""The database unreachable for a few seconds (PostgreSQL behind a relay we cut): no node
accepts a write it cannot store, and service comes back by itself."""

from __future__ import annotations

import time

from harness import Pair, Relay, Writer, check_no_loss_no_dup_no_split, stored_messages

from support import ChatUser, call, require_pg


def test_database_outage_then_recovery(tmp_path):
    require_pg()
    import dbutil

    url = dbutil.create_pg_database()
    relay = Relay(5432)
    relayed = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    assert relayed != url
    pair = Pair(relayed, tmp_path).start()
    try:
        user = ChatUser(pair.a.url, "writer")
        gid = user("POST", "/groups", {"name": "outage"}).json["id"]
        writer = Writer([pair.a.url, pair.b.url], user.token, gid).start()
        time.sleep(0.5)
        relay.cut()
        cut_at = time.monotonic()
        time.sleep(3.0)
        health = pair.health()
        assert not any(h and h["active"] for h in health), health  # the active stepped down
        reply = call(pair.a.url, "POST", "/messages", {"groupId": gid, "content": "x"},
                     token=user.token)
        assert reply.status == 503
        relay.heal()
        healed_at = time.monotonic()
        active = pair.wait_one_active(timeout=15)
        time.sleep(1.0)
        acks = writer.stop()
        during = [a for a in acks if cut_at + 2.0 < a.at < healed_at]
        assert during == []
        assert any(a.at > healed_at for a in acks), "service did not come back"
        check_no_loss_no_dup_no_split(acks, stored_messages(active.url, user.token, gid))
    finally:
        pair.stop()
        relay.close()
        dbutil.drop_pg_database(url)
