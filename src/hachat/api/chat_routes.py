"""Groups, memberships and messages: the original chat routes plus what users need."""

from __future__ import annotations

from typing import Any

from hachat.api.auth import USERNAME_PATTERN, Principal
from hachat.api.context import ApiContext
from hachat.api.errors import forbidden, invalid_field, not_found
from hachat.api.params import Params
from hachat.api.text import is_blank
from hachat.api.views import group_view, message_view, user_view
from hachat.api.writes import fenced_write, reading, require_active
from hachat.http.messages import Deferred, Request, Response, json_response
from hachat.store import NotFound, accounts, chat

CONTENT_MAX = 4000
GROUP_NAME_MAX = 100
CLIENT_ID_MAX = 128
PAGE_DEFAULT, PAGE_MAX = 50, 200


def acting_user(ctx: ApiContext, request: Request, params: Params) -> Principal:
    """The token's user; a `userId` field, when given, must be that same user."""
    require_active(ctx)
    principal = ctx.auth.principal(request, ctx.db)
    claimed = params.id("userId", required=False)
    if claimed is not None and claimed != principal.user_id:
        raise forbidden("'userId' must be the id of the user the token belongs to")
    return principal


def _member_or_403(session: Any, group_id: int, user_id: int) -> Any:
    group, member = chat.membership(session, group_id, user_id)
    if group is None:
        raise not_found("group", group_id)
    if not member:
        raise forbidden(f"you are not a member of group {group_id}")
    return group


def _group_id_from_path(request: Request) -> int:
    raw = request.context.get("id") or request.context.get("group") or ""
    value = Params({}, {"groupId": raw}).id("groupId")
    assert value is not None
    return value


# -- groups -------------------------------------------------------------------------
def chats(ctx: ApiContext, request: Request) -> Response:
    params = Params.of(request)
    me = acting_user(ctx, request, params)
    with reading(ctx) as session:
        groups = [group_view(g) for g in chat.groups_of_user(session, me.user_id)]
    return json_response(200, {"chats": groups})


def create_group(ctx: ApiContext, request: Request) -> Response:
    params = Params.of(request)
    name = params.string("name", max_length=GROUP_NAME_MAX).strip()
    if is_blank(name):
        raise invalid_field("name", "'name' must show something: not only white space, "
                                    "invisible characters or combining marks")
    member_ids = params.id_list("memberIds")
    me = acting_user(ctx, request, params)
    with fenced_write(ctx) as w:
        try:
            group = chat.create_group(w.session, name, me.user_id, member_ids)
        except NotFound as exc:
            raise not_found(exc.what, exc.id) from None
        view = group_view(group)
        ids = chat.member_ids(w.session, group.id)
        names = {u.id: u.username for u in accounts.users_by_ids(w.session, ids)}
        for user_id in ids:
            w.emit("member.added", group.id, user_id,
                   {"groupId": group.id, "groupName": name, "userId": user_id,
                    "username": names.get(user_id), "by": me.user_id})
    view["memberIds"] = ids
    return json_response(201, view)


def group_users(ctx: ApiContext, request: Request) -> Response:
    params = Params.of(request)
    group_id = params.id("groupId")
    me = acting_user(ctx, request, params)
    with reading(ctx) as session:
        _member_or_403(session, group_id, me.user_id)
        users = [user_view(u) for u in chat.member_users(session, group_id)]
    return json_response(200, {"users": users})


def add_member(ctx: ApiContext, request: Request) -> Response:
    group_id = _group_id_from_path(request)
    params = Params.of(request)
    target_id = params.id("userId", required=False) if params.has("userId") else None
    username = None
    if target_id is None:
        username = params.string("username")
        if not USERNAME_PATTERN.fullmatch(username):
            raise invalid_field("username", "'username' is not a valid username")
    require_active(ctx)
    me = ctx.auth.principal(request, ctx.db)
    with fenced_write(ctx) as w:
        group = _member_or_403(w.session, group_id, me.user_id)
        target = (accounts.get_user(w.session, target_id) if target_id is not None
                  else accounts.get_user_by_username(w.session, username))
        if target is None:
            raise not_found("user", target_id if target_id is not None else username)
        added = chat.add_member(w.session, group_id, target.id)
        if added:
            w.emit("member.added", group_id, target.id,
                   {"groupId": group_id, "groupName": group.name, "userId": target.id,
                    "username": target.username, "by": me.user_id})
        result = {"groupId": group_id, "userId": target.id, "username": target.username,
                  "added": added}
    return json_response(200, result)


def remove_member(ctx: ApiContext, request: Request) -> Response:
    group_id = _group_id_from_path(request)
    params = Params.of(request)
    target_id = params.id("userId")
    require_active(ctx)
    me = ctx.auth.principal(request, ctx.db)
    with fenced_write(ctx) as w:
        group = _member_or_403(w.session, group_id, me.user_id)
        if target_id != me.user_id and group.created_by != me.user_id:
            raise forbidden("only the group's creator may remove other members")
        target = accounts.get_user(w.session, target_id)
        if target is None or not chat.remove_member(w.session, group_id, target_id):
            raise not_found("member", target_id)
        w.emit("member.removed", group_id, target_id,
               {"groupId": group_id, "groupName": group.name, "userId": target_id,
                "username": target.username, "by": me.user_id})
    return json_response(200, {"groupId": group_id, "userId": target_id, "removed": True})


# -- messages -----------------------------------------------------------------------
def list_messages(ctx: ApiContext, request: Request) -> Response:
    params = Params.of(request)
    group_id = params.id("groupId")
    before = params.id("before", required=False)
    limit = params.integer("limit", required=False, minimum=1, maximum=PAGE_MAX,
                           default=PAGE_DEFAULT)
    me = acting_user(ctx, request, params)
    with reading(ctx) as session:
        _member_or_403(session, group_id, me.user_id)
        rows = chat.list_messages(session, group_id, before, limit)
        names = {u.id: u.username
                 for u in accounts.users_by_ids(session, {m.user_id for m in rows})}
        messages = [message_view(m, names.get(m.user_id)) for m in rows]
    next_before = messages[-1]["id"] if len(messages) == limit else None
    return json_response(200, {"messages": messages, "nextBefore": next_before})


def _content(params: Params) -> str:
    content = params.string("content", max_length=CONTENT_MAX)
    if is_blank(content):
        raise invalid_field("content", "'content' must show something: not empty, not only "
                                       "white space, invisible characters or combining marks")
    return content


def _client_message_id(request: Request, params: Params) -> str | None:
    from_body = params.string("clientMessageId", required=False, max_length=CLIENT_ID_MAX,
                              min_length=1)
    # UTF-8 text, as in the body (a value that is not UTF-8 is a 400 from the HTTP layer); the
    # HTTP layer has already taken off the spaces around it, and nothing more is stripped, so
    # the header and `clientMessageId` name the same key only when they are the same text.
    header = request.headers.get("idempotency-key")
    if header is not None:
        if not header or len(header) > CLIENT_ID_MAX:
            raise invalid_field("Idempotency-Key",
                                f"'Idempotency-Key' must have 1 to {CLIENT_ID_MAX} characters")
        if from_body is not None and from_body != header:
            raise invalid_field("clientMessageId",
                                "'clientMessageId' and 'Idempotency-Key' differ")
    return from_body if from_body is not None else header


def post_message(ctx: ApiContext, request: Request) -> Deferred:
    """Validated and authenticated here; written by the group committer (see group_commit),
    which answers once the message is committed."""
    params = Params.of(request)
    group_id = params.id("groupId")
    content = _content(params)
    client_id = _client_message_id(request, params)
    me = acting_user(ctx, request, params)
    draft = chat.MessageDraft(me.user_id, group_id, content, client_id)
    return ctx.committer.submit(draft, me.username)


def delete_message(ctx: ApiContext, request: Request) -> Response:
    params = Params.of(request)
    message_id = params.id("messageId")
    me = acting_user(ctx, request, params)
    with fenced_write(ctx) as w:
        message = chat.get_message(w.session, message_id)
        if message is None:
            raise not_found("message", message_id)
        if message.user_id != me.user_id:
            raise forbidden("only the author may delete a message")
        group_id = message.group_id
        chat.delete_message(w.session, message_id)
        from hachat.store import events as event_store

        event_store.redact_message_events(w.session, message_id)
        w.emit("message.deleted", group_id, None, {"id": message_id, "groupId": group_id})
    return json_response(200, {"deleted": message_id})
