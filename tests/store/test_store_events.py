"""The event stream: append, per-user reads, redaction, pruning and the floor."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text, update

from dbutil import post_one
from hachat.store import accounts, chat, events
from hachat.store.models import Event, utcnow


def _setup(db):
    with db.write() as s:
        ann, ben, cat = (accounts.create_user(s, n, "h") for n in ("ann", "ben", "cat"))
        g1 = chat.create_group(s, "g1", ann.id, [ben.id])
        g2 = chat.create_group(s, "g2", cat.id, [ann.id])
    return ann, ben, cat, g1, g2


def test_append_and_max_position(db):
    with db.read() as s:
        assert events.max_position(s) == 0
        assert events.stream_floor(s) == 0
    with db.write() as s:
        row = events.append_event(s, 1, "group.created", 5, None, {"b": 1, "a": "é"}, 2)
        events.append_event(s, 3, "custom", None, 9, {}, 2)
    assert row.payload == '{"b":1,"a":"é"}'  # compact
    assert row.payload_dict() == {"b": 1, "a": "é"}
    assert row.epoch == 2 and row.created_at.tzinfo is not None
    with db.read() as s:
        assert events.max_position(s) == 3


def test_events_for_user_filters_by_membership_and_target(db):
    ann, ben, cat, g1, g2 = _setup(db)
    with db.write() as s:
        # Appended out of order on purpose: positions, not insert order, decide.
        events.append_event(s, 4, "message.created", g2.id, None, {"n": 4}, 1)
        events.append_event(s, 1, "message.created", g1.id, None, {"n": 1}, 1)
        events.append_event(s, 2, "message.created", g2.id, None, {"n": 2}, 1)
        events.append_event(s, 3, "group.added", None, ben.id, {"n": 3}, 1)
        events.append_event(s, 5, "message.created", 99999, None, {"n": 5}, 1)
        events.append_event(s, 6, "message.created", g1.id, None, {"n": 6}, 1)
    with db.read() as s:
        def positions(user, since=0, upto=100, limit=500):
            return [e.position for e in events.events_for_user(s, user.id, since, upto, limit)]

        assert positions(ann) == [1, 2, 4, 6]
        assert positions(ben) == [1, 3, 6]
        assert positions(cat) == [2, 4]
        assert positions(ann, since=1, upto=4) == [2, 4]
        assert positions(ann, since=2, upto=5) == [4]
        assert positions(ann, limit=2) == [1, 2]
        assert positions(ann, since=6) == []
        assert positions(ann, since=4, upto=4) == []
        assert events.events_for_user(s, ann.id, 0, 100)[0].payload_dict() == {"n": 1}
    with db.write() as s:  # current memberships decide
        chat.remove_member(s, g1.id, ben.id)
    with db.read() as s:
        assert positions(ben) == [3]


def test_redact_message_events(db):
    ann, ben, cat, g1, g2 = _setup(db)
    with db.write() as s:
        m1, _ = post_one(s, ann.id, g1.id, "secret", 1)
        m2, _ = post_one(s, ann.id, g1.id, "keep", 1)
        events.append_event(s, 1, "message.created", g1.id, None,
                            {"message": {"id": m1.id, "content": "secret", "user_id": ann.id}}, 1)
        events.append_event(s, 2, "message.created", g1.id, None,
                            {"message": {"id": m2.id, "content": "keep"}}, 1)
        events.append_event(s, 3, "message.created", g1.id, None,
                            {"id": m1.id, "content": "secret"}, 1)
        events.append_event(s, 4, "message.pinned", g1.id, None, {"content": "not a message"},
                            1, message_id=m2.id)
    with db.write() as s:
        assert chat.delete_message(s, m1.id) is True
        assert events.redact_message_events(s, m1.id) == 2
        assert events.append_event(s, 5, "message.deleted", g1.id, None,
                                   {"message_id": m1.id}, 1).message_id == m1.id
        assert events.redact_message_events(s, m1.id) == 2  # idempotent, content stays null
    with db.read() as s:
        rows = {e.position: e.payload_dict() for e in events.events_for_user(s, ben.id, 0, 10)}
    assert rows[1] == {"message": {"id": m1.id, "content": None, "user_id": ann.id,
                                   "deleted": True}}
    assert rows[2] == {"message": {"id": m2.id, "content": "keep"}}
    assert rows[3] == {"id": m1.id, "content": None, "deleted": True}
    assert rows[4] == {"content": "not a message"}
    assert rows[5] == {"message_id": m1.id}


def test_prune_raises_floor(db):
    ann, ben, cat, g1, g2 = _setup(db)
    with db.write() as s:
        for position in range(1, 7):
            events.append_event(s, position, "message.created", g1.id, None, {"p": position}, 1)
        # Positions 1..3 are a day old; 4 is old too but committed "late" out of order.
        old = utcnow() - timedelta(days=1)
        s.execute(update(Event).where(Event.position.in_([1, 2, 4])).values(created_at=old))
    with db.write() as s:
        assert events.prune_events(s, 3600) == 4  # everything <= 4 goes, incl. recent 3
    with db.read() as s:
        assert events.stream_floor(s) == 4
        assert [e.position for e in events.events_for_user(s, ann.id, 0, 100)] == [5, 6]
        assert events.max_position(s) == 6
    with db.write() as s:
        assert events.prune_events(s, 3600) == 0
        s.execute(update(Event).values(created_at=utcnow() - timedelta(days=2)))
        assert events.prune_events(s, 3600) == 2
    with db.read() as s:
        assert events.stream_floor(s) == 6
        assert events.max_position(s) == 6  # an empty stream still remembers its floor
        assert events.events_for_user(s, ann.id, 0, 100) == []


def test_floor_never_goes_down(db):
    with db.write() as s:
        s.execute(text("UPDATE stream_meta SET floor = 50 WHERE id = 1"))
        events.append_event(s, 10, "x", None, None, {}, 1)
        s.execute(update(Event).values(created_at=utcnow() - timedelta(days=1)))
        assert events.prune_events(s, 60) == 1
    with db.read() as s:
        assert events.stream_floor(s) == 50
        assert events.max_position(s) == 50


def test_message_id_of():
    assert events.message_id_of("message.created", {"message": {"id": 3}}) == 3
    assert events.message_id_of("message.deleted", {"message_id": 4}) == 4
    assert events.message_id_of("message.created", {"id": 5}) == 5
    assert events.message_id_of("group.created", {"id": 5}) is None
    assert events.message_id_of("message.created", {"message": {"id": True}}) is None


def test_message_id_of_reads_message_events_only():
    """Regression: any event whose payload looked like {"message": {"id": N}} (a group.notify
    carries the client's JSON there) was tied to message N and redacted with it."""
    for kind in ("group.notify", "member.added", "group.created", "messages", "message"):
        assert events.message_id_of(kind, {"message": {"id": 3, "content": "x"}}) is None
        assert events.message_id_of(kind, {"message_id": 4}) is None
        assert events.message_id_of(kind, {"id": 5}) is None
    assert events.message_id_of("message.created", {"message": {"id": 3}}) == 3


def test_a_message_id_belongs_to_message_events_only(db):
    import pytest

    with pytest.raises(ValueError), db.write() as s:
        events.append_event(s, 1, "group.notify", None, None, {}, 1, message_id=5)


def test_deleting_a_message_leaves_other_kinds_of_events_alone(db):
    ann, ben, cat, g1, g2 = _setup(db)
    notice = {"message": {"id": 0, "content": "not about a message"}, "from": ann.id}
    with db.write() as s:
        m1, _ = post_one(s, ann.id, g1.id, "secret", 1)
        notice["message"]["id"] = m1.id
        events.append_event(s, 1, "message.created", g1.id, None,
                            {"id": m1.id, "content": "secret"}, 1)
        events.append_event(s, 2, "group.notify", g1.id, None, notice, 1)
        events.append_event(s, 3, "group.notify", g1.id, None, notice, 1)
        # a row written before the fix: tied to the message although it is a notice
        s.execute(text("UPDATE events SET message_id = :m WHERE position = 3"), {"m": m1.id})
    with db.write() as s:
        assert chat.delete_message(s, m1.id)
        assert events.redact_message_events(s, m1.id) == 1
    with db.read() as s:
        rows = {e.position: e.payload_dict() for e in events.events_for_user(s, ben.id, 0, 10)}
    assert rows[1] == {"id": m1.id, "content": None, "deleted": True}
    assert rows[2] == notice and rows[3] == notice


def test_membership_follows_the_users_own_member_events_by_position(db):
    ann, ben, cat, g1, g2 = _setup(db)
    with db.write() as s:
        chat.remove_member(s, g1.id, ben.id)
        for position, kind, group, target in [
                (1, "message.created", g1.id, None),
                (2, "member.removed", g1.id, ben.id),
                (3, "message.created", g1.id, None),
                (4, "member.added", g2.id, ben.id),
                (5, "message.created", g2.id, None),
                (6, "group.notify", g2.id, None)]:
            events.append_event(s, position, kind, group, target, {}, 1)
        chat.add_member(s, g2.id, ben.id)
    with db.read() as s:
        def positions(since, upto=100):
            return [e.position for e in events.events_for_user(s, ben.id, since, upto)]

        assert positions(0) == [1, 2, 4, 5, 6]  # in g1 until 2, in g2 from 4
        assert positions(1) == [2, 4, 5, 6]
        assert positions(0, upto=3) == [1, 2]
        assert positions(4) == [5, 6]
        timeline = events.membership_timeline(s, ben.id, 0)
        assert timeline.groups_at(0) == {g1.id}
        assert timeline.groups_at(2) == frozenset()
        assert timeline.groups_at(4) == {g2.id}
        assert events.membership_timeline(s, ben.id, 4).groups_at(4) == {g2.id}
