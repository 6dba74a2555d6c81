"""The durable event stream. Positions are allocated by the application (the single lease
holder's EventHub), never by the database, so rows may commit out of position order: readers
must only ask for positions up to the hub's visible position (`upto`).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from . import rawsql
from .models import Event, EventRow, Membership, StreamMeta, utcnow

__all__ = ["EventRow", "append_event", "append_events", "events_for_user", "is_message_kind",
           "max_position", "message_id_of", "prune_events", "redact_message_events",
           "stream_floor"]

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
                 *, message_id: int | None = None) -> EventRow:
    """Insert one event at `position` (payload stored as compact JSON).

    `message_id` (for redaction) defaults to what `message_id_of(kind, payload)` finds; only
    a `message.*` event may have one.
    """
    if message_id is None:
        message_id = message_id_of(kind, payload)
    elif not is_message_kind(kind):
        raise ValueError(f"a {kind!r} event is not about a message: it takes no message_id")
    values = {"position": int(position), "kind": kind, "group_id": group_id,
              "target_user_id": target_user_id, "message_id": message_id,
              "payload": _dumps(payload), "created_at": utcnow(), "epoch": int(epoch)}
    # Plain SQL, not the unit of work: this runs on every chat write.
    params = dict(values, created_at=rawsql.timestamp_param(values["created_at"],
                                                            rawsql.dialect_of(s)))
    rawsql.run(s, _INSERT_EVENT, params)
    return Event(**values)


def append_events(s: Session, items: list[tuple[int, str, int | None, int | None,
                                                dict[str, Any]]], epoch: int) -> None:
    """Insert many events, each `(position, kind, group_id, target_user_id, payload)`, as one
    batch (pipelined on PostgreSQL). Message ids for redaction come from `message_id_of`."""
    if not items:
        return
    stamp = rawsql.timestamp_param(utcnow(), rawsql.dialect_of(s))
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


def events_for_user(s: Session, user_id: int, since: int, upto: int,
                    limit: int = 500) -> list[EventRow]:
    """Events with since < position <= upto for the user's current groups or aimed at the
    user, in position order."""
    if upto <= since or limit <= 0:
        return []
    groups = select(Membership.group_id).where(Membership.user_id == user_id)
    return list(s.scalars(
        select(Event)
        .where(Event.position > since, Event.position <= upto,
               or_(Event.group_id.in_(groups), Event.target_user_id == user_id))
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
