"""Maps (method, path) to handlers; answers 404 and 405 (with Allow) itself."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from hachat.api.errors import database_unavailable
from hachat.api.params import reject_secrets_in_query
from hachat.http.messages import Deferred, HTTPError, Request, Response
from hachat.store import StoreUnavailable

log = logging.getLogger("hachat.api")

HandlerFn = Callable[[Any, Request], "Response | Deferred"]

# The most a route answered on the loop thread (`blocking=False`) takes in a body. Those
# routes need a few hundred bytes at most (a login), and every connection waits while the
# loop parses: 128 KiB of JSON can cost it ~15 ms. Worker routes take up to
# MAX_BODY_BYTES.
LOOP_BODY_MAX = 16 * 1024


class Route:
    """One handler bound to the API context. `blocking` routes run on a worker thread; the
    others, on the loop, take bodies of at most LOOP_BODY_MAX bytes (413 beyond)."""

    __slots__ = ("fn", "blocking", "ctx")

    def __init__(self, fn: HandlerFn, blocking: bool, ctx: Any) -> None:
        self.fn = fn
        self.blocking = blocking
        self.ctx = ctx

    def __call__(self, request: Request) -> Response | Deferred:
        if not self.blocking and len(request.body) > LOOP_BODY_MAX:
            raise HTTPError(413, "body_too_large",
                            f"{request.method} {request.path} takes a body of at most "
                            f"{LOOP_BODY_MAX} bytes")
        reject_secrets_in_query(request.query_string)
        try:
            return self.fn(self.ctx, request)
        except StoreUnavailable as exc:
            log.warning("database unavailable: %s", exc)
            raise database_unavailable() from None


class Router:
    """Exact paths in a dict (the hot path); a few patterns with one integer parameter."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._exact: dict[str, dict[str, Route]] = {}
        self._patterns: list[tuple[re.Pattern[str], str, dict[str, Route]]] = []
        self._prefixes: list[tuple[str, dict[str, Route]]] = []

    def add(self, method: str, path: str, fn: HandlerFn, *, blocking: bool = True) -> None:
        route = Route(fn, blocking, self._ctx)
        if "{" in path:
            name = path[path.index("{") + 1:path.index("}")]
            regex = re.compile("^" + re.sub(r"\{\w+\}", r"([^/]+)", path) + "$")
            for pattern, pname, methods in self._patterns:
                if pattern.pattern == regex.pattern and pname == name:
                    methods[method] = route
                    return
            self._patterns.append((regex, name, {method: route}))
        elif path.endswith("/*"):
            prefix = path[:-1]
            for existing, methods in self._prefixes:
                if existing == prefix:
                    methods[method] = route
                    return
            self._prefixes.append((prefix, {method: route}))
        else:
            self._exact.setdefault(path, {})[method] = route

    def resolve(self, request: Request) -> Route:
        methods = self._exact.get(request.path)
        if methods is None:
            methods = self._match_pattern(request)
        route = methods.get(request.method)
        if route is None:
            if request.method == "HEAD" and "GET" in methods:
                return methods["GET"]
            allow = ", ".join(sorted(methods))
            raise HTTPError(405, "method_not_allowed",
                            f"{request.method} is not allowed on {request.path}; use {allow}",
                            headers=(("Allow", allow),))
        return route

    def _match_pattern(self, request: Request) -> dict[str, Route]:
        for regex, name, methods in self._patterns:
            match = regex.match(request.path)
            if match:
                request.context[name] = match.group(1)
                return methods
        for prefix, methods in self._prefixes:
            if request.path.startswith(prefix):
                request.context["rest"] = request.path[len(prefix):]
                return methods
        raise HTTPError(404, "not_found", f"no route for {request.path}",
                        extra={"resource": "route"})
