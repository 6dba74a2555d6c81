"""The durable event stream. Positions are allocated by the application (the single lease
holder's EventHub), never by the database, so rows may commit out of position order: readers
must only ask for positions up to the hub's visible position (`upto`).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from . import rawsql
from .models import Event, EventRow, StreamMeta, utcnow

__all__ = ["EventRow", "MembershipTimeline", "append_event", "append_events",
           "events_for_user", "is_message_kind", "max_position", "membership_timeline",
           "message_id_of", "prune_events", "redact_message_events", "stream_floor"]

STREAM_META_ID = 1


def _dumps(payload: dict[str, Any]) -> str:
    # allow_nan=False: a non-finite float would be stored as `Infinity`, which is not JSON.
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


MESSAGE_KIND_PREFIX = "message."


def is_message_kind(kind: str) -> bool:
    """Only these events are about a message (and redacted with it). Others may carry any
    JSON, e.g. a group.notify holds the client's own {"message": ...}."""
    return kind.startswith(MESSAGE_KIND_PREFIX)


def message_id_of(kind: str, payload: dict[str, Any]) -> int | None:
    """The message a `message.*` event is about, read from its payload:
    payload["message"]["id"], else payload["message_id"], else payload["id"]. None for every
    other kind, whatever its payload holds."""
    if not is_message_kind(kind):
        return None
    message = payload.get("message")
    if isinstance(message, dict) and _int_or_none(message.get("id")) is not None:
        return message["id"]
    if _int_or_none(payload.get("message_id")) is not None:
        return payload["message_id"]
    if _int_or_none(payload.get("id")) is not None:
        return payload["id"]
    return None


def append_event(s: Session, position: int, kind: str, group_id: int | None,
                 target_user_id: int | None, payload: dict[str, Any], epoch: int,
                 *, message_id: int | None = None,
                 created_at: datetime | None = None) -> EventRow:
    """Insert one event at `position` (payload stored as compact JSON).

    `message_id` (for redaction) defaults to what `message_id_of(kind, payload)` finds; only
    a `message.*` event may have one. `created_at` (aware) defaults to now; pass the moment
    the caller also shows for the event, so the stored row reads back the same.
    """
    if message_id is None:
        message_id = message_id_of(kind, payload)
    elif not is_message_kind(kind):
        raise ValueError(f"a {kind!r} event is not about a message: it takes no message_id")
    values = {"position": int(position), "kind": kind, "group_id": group_id,
              "target_user_id": target_user_id, "message_id": message_id,
              "payload": _dumps(payload), "created_at": created_at or utcnow(),
              "epoch": int(epoch)}
    # Plain SQL, not the unit of work: this runs on every chat write.
    params = dict(values, created_at=rawsql.timestamp_param(values["created_at"],
                                                            rawsql.dialect_of(s)))
    rawsql.run(s, _INSERT_EVENT, params)
    return Event(**values)


def append_events(s: Session, items: list[tuple[int, str, int | None, int | None,
                                                dict[str, Any]]], epoch: int,
                  *, created_at: datetime | None = None) -> None:
    """Insert many events, each `(position, kind, group_id, target_user_id, payload)`, as one
    batch (pipelined on PostgreSQL). Message ids for redaction come from `message_id_of`;
    `created_at` (aware, default now) is every row's."""
    if not items:
        return
    stamp = rawsql.timestamp_param(created_at or utcnow(), rawsql.dialect_of(s))
    rows = [{"position": int(position), "kind": kind, "group_id": group_id,
             "target_user_id": target, "message_id": message_id_of(kind, payload),
             "payload": _dumps(payload), "created_at": stamp, "epoch": int(epoch)}
            for position, kind, group_id, target, payload in items]
    rawsql.run_many(s, _INSERT_EVENT, rows)


_INSERT_EVENT = (
    "INSERT INTO events (position, kind, group_id, target_user_id, message_id, payload, "
    "created_at, epoch) VALUES (:position, :kind, :group_id, :target_user_id, :message_id, "
    ":payload, :created_at, :epoch)"
)


def stream_floor(s: Session) -> int:
    """The highest position ever pruned: events at or below it are gone."""
    return int(s.scalar(select(StreamMeta.floor).where(StreamMeta.id == STREAM_META_ID)) or 0)


def max_position(s: Session) -> int:
    """The highest position used so far (0 for an empty stream), never below the floor."""
    top = s.scalar(select(func.max(Event.position))) or 0
    return max(int(top), stream_floor(s))


MEMBERSHIP_KINDS = ("member.added", "member.removed")


class MembershipTimeline:
    """Which groups a user belonged to at each stream position after `since`.

    A user belongs to a group from its own `member.added` event (exclusive: that event
    reaches it as aimed at it) until its own `member.removed` event, whatever the membership
    is when the stream is read: reading from the same cursor gives the same events before
    and after a membership change, so a client resuming late neither loses what was sent
    while it was a member nor gets what was sent before it joined or after it left.
    Membership without events (rows written directly) counts from the start.
    """

    def __init__(self, current: set[int], changes: list[tuple[int, int, str]]) -> None:
        # changes: (position, group_id, kind) after `since`, in position order
        self.current = current
        self.changes = changes
        by_group: dict[int, list[tuple[int, bool]]] = {}
        for position, group_id, kind in changes:
            by_group.setdefault(group_id, []).append((position, kind == "member.added"))
        self._by_group = by_group

    @property
    def groups(self) -> set[int]:
        """Every group the user belongs to at some position after `since`."""
        return self.current | set(self._by_group)

    def member_at(self, group_id: int, position: int) -> bool:
        """Whether the user belonged to the group at `position` (> since)."""
        steps = self._by_group.get(group_id)
        if not steps:
            return group_id in self.current
        state = not steps[0][1]  # before the first change: the opposite of what it did
        for at, added in steps:
            if at >= position:
                break
            state = added
        return state

    def groups_at(self, position: int) -> frozenset[int]:
        """The groups the user belongs to just after `position` (for events after it)."""
        return frozenset(g for g in self.groups if self.member_at(g, position + 1))

    def intervals(self, group_id: int, since: int, upto: int) -> list[tuple[int, int]]:
        """(lo, hi) ranges, lo < position <= hi, within (since, upto], of membership."""
        steps = self._by_group.get(group_id)
        if not steps:
            return [(since, upto)] if group_id in self.current else []
        out: list[tuple[int, int]] = []
        state = not steps[0][1]
        lo = since
        for at, added in steps:
            if at > upto:
                break
            if state and not added:
                out.append((lo, at))  # member up to its removal (the event itself is aimed)
            elif added and not state:
                lo = at
            state = added
        if state:
            out.append((lo, upto))
        return [(a, b) for a, b in out if b > a]


_TIMELINE_SQL = (
    "SELECT position, group_id, kind FROM events WHERE target_user_id = :user_id "
    "AND position > :since AND kind IN ('member.added', 'member.removed') "
    "UNION ALL SELECT NULL, group_id, NULL FROM memberships WHERE user_id = :user_id"
)


def membership_timeline(s: Session, user_id: int, since: int) -> MembershipTimeline:
    """The user's memberships over the stream after `since`: its own member.* events after
    it and its current memberships, read in one statement (so from one snapshot)."""
    current: set[int] = set()
    changes: list[tuple[int, int, str]] = []
    for position, group_id, kind in rawsql.run(s, _TIMELINE_SQL,
                                               {"user_id": int(user_id), "since": int(since)}):
        if position is None:
            current.add(int(group_id))
        elif group_id is not None:
            changes.append((int(position), int(group_id), kind))
    changes.sort()
    return MembershipTimeline(current, changes)


def events_for_user(s: Session, user_id: int, since: int, upto: int,
                    limit: int = 500, timeline: MembershipTimeline | None = None
                    ) -> list[EventRow]:
    """Events with since < position <= upto aimed at the user or of a group the user
    belonged to at the event's position (see `MembershipTimeline`), in position order."""
    if upto <= since or limit <= 0:
        return []
    if timeline is None:
        timeline = membership_timeline(s, user_id, since)
    whole: list[int] = []
    ranges = []
    for g in sorted(timeline.groups):
        spans = timeline.intervals(g, since, upto)
        if spans == [(since, upto)]:
            whole.append(g)
        for lo, hi in spans if spans != [(since, upto)] else ():
            ranges.append(and_(Event.group_id == g, Event.position > lo, Event.position <= hi))
    visible = [Event.target_user_id == user_id, *ranges]
    if whole:
        visible.append(Event.group_id.in_(whole))
    return list(s.scalars(
        select(Event)
        .where(Event.position > since, Event.position <= upto, or_(*visible))
        .order_by(Event.position)
        .limit(int(limit))
    ))


def _redact(payload: dict[str, Any]) -> bool:
    changed = False
    message = payload.get("message")
    for part in (payload, message if isinstance(message, dict) else None):
        if part is not None and "content" in part:
            part["content"] = None
            part["deleted"] = True
            changed = True
    return changed


def redact_message_events(s: Session, message_id: int) -> int:
    """After deleting a message: blank its content in every stored `message.*` event about
    it (the `content` key, top-level or under "message", becomes null and "deleted": true is
    added). Events of other kinds are never touched, even rows stored before `message_id_of`
    kept to message kinds. Returns how many events changed."""
    changed = 0
    rows = s.scalars(select(Event).where(Event.message_id == message_id,
                                         Event.kind.startswith(MESSAGE_KIND_PREFIX,
                                                               autoescape=True))).all()
    for row in rows:
        payload = row.payload_dict()
        if _redact(payload):
            row.payload = _dumps(payload)
            changed += 1
    s.flush()
    return changed


def prune_events(s: Session, older_than_seconds: float) -> int:
    """Delete events created more than `older_than_seconds` ago, and every event at or below
    the newest of those, so that "everything <= floor is gone" holds. Raises the floor to the
    highest pruned position; returns how many events were deleted."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    top = s.scalar(select(func.max(Event.position)).where(Event.created_at < cutoff))
    if top is None:
        return 0
    result = s.execute(
        delete(Event).where(Event.position <= top).execution_options(synchronize_session=False)
    )
    s.execute(
        update(StreamMeta)
        .where(StreamMeta.id == STREAM_META_ID, StreamMeta.floor < top)
        .values(floor=top)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)
