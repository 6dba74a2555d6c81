"""Routes every node serves, whatever its role: root, health, readiness, fall/revive and the
node-status long-poll (the original API)."""

from __future__ import annotations

from typing import Any

from hachat.api.context import ApiContext
from hachat.api.params import Params
from hachat.http.messages import Deferred, HTTPError, Request, Response, dumps, json_response

_NOT_READY_HEADERS = (("Retry-After", "1"),)
# The page loads only its own files and may not be framed by another site.
PAGE_HEADERS = (
    ("Cache-Control", "no-cache"),
    ("Content-Security-Policy",
     "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)


class HealthCache:
    """The /health body, rebuilt only when the node's published state changes."""

    __slots__ = ("key", "body")

    def __init__(self) -> None:
        self.key: tuple[int, bool] = (-1, False)
        self.body = b""


def root(ctx: ApiContext, request: Request) -> Response:
    accept = request.headers.get("accept", "")
    if "text/html" in accept and "index.html" in ctx.static_files:
        body, content_type = ctx.static_files["index.html"]
        return Response(200, body, content_type, PAGE_HEADERS)
    snap = ctx.node.snapshot()
    return json_response(200, {"service": "hachat", "status": "ok", "node": snap["node"],
                                "active": snap["active"]})


def static(ctx: ApiContext, request: Request) -> Response:
    name = request.context.get("rest", "")
    found = ctx.static_files.get(name)
    if found is None:
        raise HTTPError(404, "not_found", f"no static file {name!r}", extra={"resource": "file"})
    body, content_type = found
    return Response(200, body, content_type, PAGE_HEADERS)


def make_health(ctx: ApiContext):
    cache = HealthCache()

    def health(ctx: ApiContext, request: Request) -> Response:
        # The lease deadline can lapse without a role change (the keeper may be stuck in a
        # database call), so "active" is part of the key.
        key = (ctx.status.version, ctx.node.is_active)
        if key != cache.key:
            cache.body = dumps(ctx.node.snapshot())
            cache.key = key
        return Response(200, cache.body)

    return health


def ready(ctx: ApiContext, request: Request) -> Response:
    if ctx.node.is_active:
        return json_response(200, {"ready": True, "node": ctx.settings.cluster.node_id})
    return json_response(503, {"ready": False, "error": "not_active",
                               "message": "this node is not the active node",
                               "active": ctx.node.leader_url}, _NOT_READY_HEADERS)


def fall(ctx: ApiContext, request: Request) -> Response:
    ctx.auth.require_admin(request)
    ctx.keeper.fall()
    return json_response(200, ctx.node.snapshot())


def revive(ctx: ApiContext, request: Request) -> Response:
    ctx.auth.require_admin(request)
    ctx.keeper.revive()
    return json_response(200, ctx.node.snapshot())


def _render_status(state: dict[str, Any], version: int, changed: bool) -> Response:
    body = dict(state)
    body["version"] = version
    body["changed"] = changed
    return json_response(200, body)


def subscribe_status(ctx: ApiContext, request: Request) -> Response | Deferred:
    params = Params.of(request)
    timeout = params.number("timeout", minimum=0, maximum=ctx.settings.poll_timeout_max,
                            default=ctx.settings.status_timeout_default)
    since = params.integer("since", required=False, minimum=0)
    return ctx.status.wait(since, timeout, _render_status)


def stats(ctx: ApiContext, request: Request) -> Response:
    """Counters for operators and tests: connections, parked requests, waiters."""
    ctx.auth.require_admin(request)
    return json_response(200, {"node": ctx.node.snapshot(), "http": ctx.server_stats(),
                               "hub": ctx.hub.stats(), "status": ctx.status.stats(),
                               "messageCommit": (ctx.committer.stats()
                                                 if ctx.committer is not None else None)})
