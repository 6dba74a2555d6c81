"""The API's error vocabulary: each builds an `HTTPError` with a stable `error` code."""

from __future__ import annotations

from hachat.http.messages import HTTPError


def invalid_json(message: str) -> HTTPError:
    return HTTPError(400, "invalid_json", message)


def secret_in_query(field: str, message: str) -> HTTPError:
    return HTTPError(400, "secret_in_query", message, extra={"field": field})


def invalid_field(field: str, message: str) -> HTTPError:
    return HTTPError(422, "invalid_field", message, extra={"field": field})


def unauthorized(message: str = "send 'Authorization: Bearer <token>' from POST /login") -> HTTPError:
    return HTTPError(401, "unauthorized", message, headers=(("WWW-Authenticate", "Bearer"),))


def forbidden(message: str) -> HTTPError:
    return HTTPError(403, "forbidden", message)


def not_found(what: str, ident: object) -> HTTPError:
    return HTTPError(404, "not_found", f"{what} {ident} does not exist",
                     extra={"resource": what})


def not_active(leader_url: str | None) -> HTTPError:
    where = f"; the active node is {leader_url}" if leader_url else ""
    return HTTPError(503, "not_active", f"this node is not the active node{where}",
                     headers=(("Retry-After", "1"),), extra={"active": leader_url})


def database_unavailable() -> HTTPError:
    return HTTPError(503, "database_unavailable",
                     "the database cannot be reached right now; retry shortly",
                     headers=(("Retry-After", "1"),))
