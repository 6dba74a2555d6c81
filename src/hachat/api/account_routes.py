"""POST /login (log in, or create the account when the username is new) and POST /logout."""

from __future__ import annotations

from hachat.api.auth import PASSWORD_MAX, PASSWORD_MIN, USERNAME_PATTERN, Principal
from hachat.api.context import ApiContext
from hachat.api.errors import database_unavailable, invalid_field, unauthorized
from hachat.api.params import Params
from hachat.api.writes import fenced_write, reading, require_active
from hachat.http.messages import Deferred, HTTPError, Request, Response, json_response
from hachat.store import StoreUnavailable, UsernameTaken, accounts

_GUESSES = "failed logins for this username"


def _credentials(request: Request) -> tuple[str, str]:
    params = Params.of(request)
    username = params.string("username")
    if not USERNAME_PATTERN.fullmatch(username):
        raise invalid_field("username", "'username' must be 1-32 letters, digits, '.', '_' or '-'")
    password = params.secret("password", min_length=PASSWORD_MIN, max_length=PASSWORD_MAX)
    return username, password


def login(ctx: ApiContext, request: Request) -> Deferred:
    """On the loop thread: cheap checks, then the password work on the login lane."""
    ctx.login_limiter.check(ctx.auth.client_key(request))
    username, password = _credentials(request)
    ctx.failed_logins.require(accounts.username_key(username), _GUESSES)
    require_active(ctx)
    return ctx.login_lane.submit(lambda: _login(ctx, username, password))


def _login(ctx: ApiContext, username: str, password: str) -> Response:
    try:
        return _log_in_or_create(ctx, username, password)
    except StoreUnavailable:
        raise database_unavailable() from None


def _log_in_or_create(ctx: ApiContext, username: str, password: str) -> Response:
    for _attempt in range(2):
        with reading(ctx) as session:
            user = accounts.get_user_by_username(session, username)
            existing = (user.id, user.username, user.password_hash) if user else None
        if existing is not None:
            user_id, stored_name, password_hash = existing
            key = accounts.username_key(stored_name)
            ctx.failed_logins.require(key, _GUESSES)  # again: logins queued on the lane together
            if not ctx.auth.verify_password(password_hash, password):
                ctx.failed_logins.spend(key)
                raise HTTPError(401, "invalid_credentials",
                                "wrong password for this username (or the name is taken)")
            with fenced_write(ctx) as w:
                token = accounts.issue_token(w.session, user_id)
            ctx.auth.remember(Principal(user_id, stored_name, token))
            return json_response(200, {"userId": user_id, "username": stored_name,
                                       "token": token, "created": False})
        password_hash = ctx.auth.hash_password(password)
        try:
            with fenced_write(ctx) as w:
                user = accounts.create_user(w.session, username, password_hash)
                user_id, stored_name = user.id, user.username
                token = accounts.issue_token(w.session, user_id)
        except UsernameTaken:
            continue  # created by a concurrent request: log in against it
        ctx.auth.remember(Principal(user_id, stored_name, token))
        return json_response(201, {"userId": user_id, "username": stored_name,
                                   "token": token, "created": True})
    raise HTTPError(409, "username_taken", "the username was taken at the same moment; retry")


def logout(ctx: ApiContext, request: Request) -> Response:
    require_active(ctx)
    token = ctx.auth.bearer(request)
    if token is None:
        raise unauthorized()
    with fenced_write(ctx) as w:
        user_id = accounts.revoke_token(w.session, token)
    ctx.auth.forget(token)
    if user_id is None:
        raise unauthorized("the token is unknown or already revoked")
    ctx.hub.end_session(user_id, token, unauthorized("this token was logged out").to_response())
    return json_response(200, {"status": "logged_out"})
