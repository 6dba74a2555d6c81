"""Fenced writes: every write checks, in its own transaction, that this node still holds the
lease under its epoch, and every event it produces takes a stream position from the hub.

    with fenced_write(ctx) as w:
        msg = chat.create_message(w.session, ..., epoch=w.epoch)
        w.emit("message.created", group_id, None, payload)

On commit the hub learns the events; on any failure their positions are abandoned.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from hachat.api.context import ApiContext
from hachat.api.errors import database_unavailable, not_active
from hachat.api.views import iso
from hachat.cluster.node import NotActive
from hachat.realtime.events import Event
from hachat.store import Fenced, StoreUnavailable
from hachat.store import events as event_store
from hachat.store.lease import assert_holder


class StreamWriter:
    """The session and epoch of one fenced transaction, plus the events it emits."""

    def __init__(self, ctx: ApiContext, session: Any, epoch: int) -> None:
        self.ctx = ctx
        self.session = session
        self.epoch = epoch
        self.pending: list[tuple[Any, Event]] = []

    def emit(self, kind: str, group_id: int | None, target_user_id: int | None,
             payload: dict[str, Any]) -> Event:
        ticket = self.ctx.hub.reserve()
        # One clock reading for the row and the event the hub delivers live, so a replay from
        # the database gives the very same event.
        moment = datetime.now(timezone.utc)
        # Registered before the insert so an insert failure still abandons the position.
        event = Event(ticket.position, kind, group_id, target_user_id, payload, iso(moment))
        self.pending.append((ticket, event))
        event_store.append_event(self.session, ticket.position, kind, group_id, target_user_id,
                                 payload, self.epoch, created_at=moment)
        return event

    def emit_many(self, items: list[tuple[str, int | None, int | None, dict[str, Any]]]
                  ) -> list[Event]:
        """`emit` for many `(kind, group_id, target_user_id, payload)`: positions in list
        order, rows inserted as one batch."""
        moment = datetime.now(timezone.utc)  # the rows' created_at and the events' createdAt
        stamp = iso(moment)
        events: list[Event] = []
        rows = []
        for kind, group_id, target, payload in items:
            ticket = self.ctx.hub.reserve()
            event = Event(ticket.position, kind, group_id, target, payload, stamp)
            self.pending.append((ticket, event))
            events.append(event)
            rows.append((ticket.position, kind, group_id, target, payload))
        event_store.append_events(self.session, rows, self.epoch, created_at=moment)
        return events


def require_active(ctx: ApiContext) -> None:
    if not ctx.node.is_active:
        raise not_active(ctx.node.leader_url)


@contextmanager
def fenced_write(ctx: ApiContext) -> Iterator[StreamWriter]:
    try:
        node_id, epoch = ctx.node.write_claim()
    except NotActive:
        raise not_active(ctx.node.leader_url) from None
    writer: StreamWriter | None = None
    committed = body_done = False
    try:
        with ctx.db.write() as session:
            assert_holder(session, node_id, epoch)
            writer = StreamWriter(ctx, session, epoch)
            yield writer
            body_done = True
        committed = True
    except Fenced:
        ctx.node.demote("fenced", epoch=epoch)
        raise not_active(ctx.node.leader_url) from None
    except StoreUnavailable:
        raise database_unavailable() from None
    finally:
        if writer is not None and writer.pending:
            # The commit failed after the body ran: it may still have happened. The hub then
            # sends the readers to the database once the horizon passes these positions,
            # rather than let one skip a row it never saw.
            uncertain = body_done and not committed
            for ticket, event in writer.pending:
                ctx.hub.complete(ticket, event if committed else None, uncertain=uncertain)


@contextmanager
def reading(ctx: ApiContext) -> Iterator[Any]:
    """A read transaction, with 'database unreachable' turned into 503."""
    try:
        with ctx.db.read() as session:
            yield session
    except StoreUnavailable:
        raise database_unavailable() from None
