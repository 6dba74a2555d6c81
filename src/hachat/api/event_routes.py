"""GET /events (the durable per-user stream, long-polled) and POST /notify/{group}."""

from __future__ import annotations

import json

from hachat.api.chat_routes import _group_id_from_path, _member_or_403
from hachat.api.context import ApiContext
from hachat.api.errors import invalid_field, not_found
from hachat.api.params import Params
from hachat.api.views import iso
from hachat.api.writes import fenced_write, reading, require_active
from hachat.http.messages import Deferred, HTTPError, Request, Response, dumps
from hachat.realtime.events import Event
from hachat.store import chat
from hachat.store import events as event_store

PAGE = 500
NOTIFY_MAX_BYTES = 16 * 1024


# What an event whose stored data cannot be read or encoded carries instead (one written
# before a limit on bodies existed): the stream goes on around it.
_UNREADABLE = (RecursionError, ValueError)


def render_events(events: list[Event], cursor: int) -> Response:
    """Shared by every waiter, so the hub can render one body for many."""
    try:
        return Response(200, dumps({"events": [e.to_json_obj() for e in events],
                                    "cursor": cursor}))
    except _UNREADABLE:
        return Response(200, dumps({"events": [_encodable(e) for e in events],
                                    "cursor": cursor}))


def _encodable(event: Event) -> dict:
    obj = event.to_json_obj()
    try:
        dumps(obj)
    except _UNREADABLE:
        obj.update(data=None, unreadable=True)
    return obj


def _row_to_event(row) -> Event:
    try:
        payload = row.payload_dict()
    except _UNREADABLE:
        payload = None  # served as `"data": null, "unreadable": true`
    return Event(row.position, row.kind, row.group_id, row.target_user_id, payload,
                 iso(row.created_at))


def events(ctx: ApiContext, request: Request) -> Response | Deferred:
    params = Params.of(request)
    since = params.integer("since", required=False, minimum=0)
    timeout = params.number("timeout", minimum=0, maximum=ctx.settings.poll_timeout_max,
                            default=ctx.settings.status_timeout_default)
    require_active(ctx)
    me = ctx.auth.principal(request, ctx.db)
    if since is None:
        return render_events([], ctx.hub.head_position())
    for _attempt in range(3):
        upto = ctx.hub.visible_position()
        if since > upto:
            if not ctx.hub.handed_out(since):
                raise HTTPError(410, "cursor_unknown",
                                f"cursor {since} is ahead of the stream ({upto}); reload with "
                                "GET /messages and take a fresh cursor from GET /events")
            # A position written here whose earlier neighbours are still in flight (e.g. the
            # eventId of a notify): nothing after it is visible yet, so wait from it.
            upto = since
        with reading(ctx) as session:
            floor = event_store.stream_floor(session)
            if since < floor:
                raise HTTPError(410, "cursor_expired",
                                f"cursor {since} is older than the retention window; reload "
                                "history with GET /messages and take a fresh cursor from "
                                "GET /events", extra={"floor": floor})
            # Membership as of each event's position, not as of now: the same cursor gives
            # the same events whenever it is read (on either node, before or after a
            # membership change).
            timeline = event_store.membership_timeline(session, me.user_id, since)
            rows = event_store.events_for_user(session, me.user_id, since, upto, PAGE,
                                               timeline=timeline)
            if rows:
                found = [_row_to_event(r) for r in rows]
                return render_events(found, found[-1].position)
        # The groups as of `upto`: a change after it (committed, not yet visible) reaches the
        # waiter as its own member.* event, which makes it read the database again.
        deferred = ctx.hub.wait(me.user_id, timeline.groups_at(upto), since, upto, timeout,
                                render_events, session=me.token)
        if deferred is not None:
            return deferred
    return render_events([], since)


def notify(ctx: ApiContext, request: Request) -> Response:
    group_id = _group_id_from_path(request)
    params = Params.of(request)
    message = params.value("message")
    try:
        encoded = json.dumps(message, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise invalid_field("message", "'message' is not valid Unicode text") from None
    if len(encoded) > NOTIFY_MAX_BYTES:
        raise invalid_field("message", f"'message' must encode to at most {NOTIFY_MAX_BYTES} bytes")
    require_active(ctx)
    sender = None
    if not ctx.auth.is_admin(request):
        sender = ctx.auth.principal(request, ctx.db).user_id
    with fenced_write(ctx) as w:
        if sender is None:
            if chat.get_group(w.session, group_id) is None:
                raise not_found("group", group_id)
        else:
            _member_or_403(w.session, group_id, sender)
        event = w.emit("group.notify", group_id, None, {"message": message, "from": sender})
    return Response(200, dumps({"status": "notified", "groupId": group_id,
                                "eventId": event.position}))
