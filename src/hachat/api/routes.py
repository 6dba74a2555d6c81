"""The route table: one place that lists every path, method and whether it may block."""

from __future__ import annotations

from hachat.api import account_routes, chat_routes, event_routes, node_routes
from hachat.api.context import ApiContext
from hachat.api.router import Router


def build_router(ctx: ApiContext) -> Router:
    r = Router(ctx)
    # Answered on the loop thread: no database, no waiting on locks.
    r.add("GET", "/", node_routes.root, blocking=False)
    r.add("GET", "/static/*", node_routes.static, blocking=False)
    r.add("GET", "/health", node_routes.make_health(ctx), blocking=False)
    r.add("GET", "/ready", node_routes.ready, blocking=False)
    r.add("GET", "/subscribe/status", node_routes.subscribe_status, blocking=False)
    r.add("GET", "/stats", node_routes.stats, blocking=False)
    # Everything that touches the database runs on a worker thread.
    r.add("POST", "/fall", node_routes.fall)
    r.add("POST", "/revive", node_routes.revive)
    # Checked on the loop, then hashed on the login lane's own threads: returns a Deferred.
    r.add("POST", "/login", account_routes.login, blocking=False)
    r.add("POST", "/logout", account_routes.logout)
    r.add("GET", "/chats", chat_routes.chats)
    r.add("POST", "/groups", chat_routes.create_group)
    r.add("POST", "/groups/{id}/members", chat_routes.add_member)
    r.add("DELETE", "/groups/{id}/members", chat_routes.remove_member)
    r.add("GET", "/group-users", chat_routes.group_users)
    r.add("GET", "/messages", chat_routes.list_messages)
    r.add("POST", "/messages", chat_routes.post_message)
    r.add("DELETE", "/messages", chat_routes.delete_message)
    r.add("GET", "/events", event_routes.events)
    r.add("POST", "/notify/{group}", event_routes.notify)
    return r
