"""Passwords (argon2id), bearer tokens, and the admin rule for /fall and /revive."""

from __future__ import annotations

import hmac
import ipaddress
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from hachat.api.errors import forbidden, unauthorized
from hachat.http.addresses import client_key, is_loopback
from hachat.http.messages import Request
from hachat.store import accounts

# 1-32 of letters, digits, '.', '_', '-', with at least one letter or digit ('..' is no name).
USERNAME_PATTERN = re.compile(r"(?=[._-]*[A-Za-z0-9])[A-Za-z0-9._-]{1,32}")
PASSWORD_MIN, PASSWORD_MAX = 8, 256


@dataclass(frozen=True, slots=True)
class _Lookup:
    """When a token lookup began, as the cache counts time (see `Authenticator.remember`)."""

    generation: int
    forgets: int


@dataclass(frozen=True, slots=True)
class Principal:
    """The user a request acts for."""

    user_id: int
    username: str
    token: str


class Authenticator:
    """Hashes passwords and resolves bearer tokens, with a small cache of live tokens.

    The cache holds only what this process saw in its current leadership term: the composition
    root clears it whenever the node becomes active, since another node may have written
    (revoked tokens) in between. Logout on this node evicts at once.

    A cache miss reads the database and then fills the cache; a logout (`forget`) or a `clear`
    may run in between. So a lookup takes a `_Lookup` stamp before its read, and the fill is
    refused, under the lock, when the token was forgotten meanwhile, when the cache was
    cleared meanwhile, or when the record of forgotten tokens overflowed since the stamp
    (then we cannot tell, and skipping a fill only costs a database read later).
    """

    def __init__(self, admin_token: str | None, cache_size: int = 100_000,
                 revoked_size: int = 10_000) -> None:
        self._hasher = PasswordHasher()
        self._admin_token = admin_token
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # Guarded by _lock. `_generation` counts clears; `_forgets` counts forget() calls.
        # `_revoked` maps recently forgotten tokens to their forget count (a revoked token
        # never comes back, so an entry only has to outlive the lookups in flight);
        # `_revoked_floor` is the count of the newest entry dropped to bound its size.
        self._generation = 0
        self._forgets = 0
        self._revoked: OrderedDict[str, int] = OrderedDict()
        self._revoked_size = revoked_size
        self._revoked_floor = 0

    # -- passwords ------------------------------------------------------------------
    def hash_password(self, password: str) -> str:
        """argon2id: ~64 MiB and tens of ms a call; callers run it on the login lane."""
        return self._hasher.hash(password)

    def verify_password(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    # -- tokens ---------------------------------------------------------------------
    @staticmethod
    def bearer(request: Request) -> str | None:
        value = request.headers.get("authorization")
        if not value:
            return None
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            return None
        return token

    def principal(self, request: Request, db) -> Principal:
        """The token's user, or 401."""
        token = self.bearer(request)
        if token is None:
            raise unauthorized()
        with self._lock:
            cached = self._cache.get(token)
            if cached is not None:
                self._cache.move_to_end(token)
                return cached
            stamp = _Lookup(self._generation, self._forgets)
        with db.read() as session:
            user = accounts.user_for_token(session, token)
            if user is None:
                raise unauthorized("the token is unknown, expired or revoked; log in again")
            principal = Principal(user.id, user.username, token)
        self.remember(principal, stamp)
        return principal

    def remember(self, principal: Principal, stamp: _Lookup | None = None) -> None:
        """Cache a live token. `stamp` (taken before the database read that found it): the
        fill is skipped if a logout or a clear may have happened since."""
        with self._lock:
            if stamp is not None and (stamp.generation != self._generation
                                      or stamp.forgets < self._revoked_floor):
                return
            if principal.token in self._revoked:
                return
            self._cache[principal.token] = principal
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def forget(self, token: str) -> None:
        """The token was revoked: evict it, and keep any lookup in flight from caching it."""
        with self._lock:
            self._cache.pop(token, None)
            self._forgets += 1
            self._revoked[token] = self._forgets
            self._revoked.move_to_end(token)
            while len(self._revoked) > self._revoked_size:
                _, dropped = self._revoked.popitem(last=False)
                self._revoked_floor = max(self._revoked_floor, dropped)

    def clear(self) -> None:
        """Forget every cached token; lookups in flight do not cache what they find."""
        with self._lock:
            self._cache.clear()
            self._generation += 1

    @staticmethod
    def client_key(request: Request) -> str:
        """Who is asking, for rate limits: the socket peer's address, unless the peer is a
        proxy we trust (loopback: HAProxy on this machine). Then the LAST X-Forwarded-For
        value: the one that proxy added. Earlier values (and a header of the client's own,
        which arrives joined before the proxy's) are whatever the client wrote. IPv6
        addresses count by their /64 (`addresses.client_key`)."""
        host = request.client_address[0] if request.client_address else "?"
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded is None or not is_loopback(host):
            return client_key(host)
        last = forwarded.rsplit(",", 1)[-1].strip()
        try:
            ipaddress.ip_address(last)
        except ValueError:
            return client_key(host)  # not what a proxy writes: count it against the proxy
        return client_key(last)

    # -- admin ----------------------------------------------------------------------
    def is_admin(self, request: Request) -> bool:
        token = self.bearer(request)
        return bool(self._admin_token and token
                    and hmac.compare_digest(token.encode(), self._admin_token.encode()))

    def require_admin(self, request: Request) -> None:
        """ADMIN_TOKEN when set; without one, loopback clients only."""
        if self._admin_token:
            if not self.is_admin(request):
                raise forbidden("this needs 'Authorization: Bearer <ADMIN_TOKEN>'")
            return
        if "x-forwarded-for" in request.headers or "forwarded" in request.headers:
            # Came through a proxy on this machine: the real client is elsewhere.
            raise forbidden("set ADMIN_TOKEN to allow this through a proxy; "
                            "without it only direct loopback clients may")
        if _sent_by_a_web_page(request):
            # A browser on this machine running some site's script (cross-site, or same-origin
            # after DNS rebinding): loopback by address, but not the operator.
            raise forbidden("a request a web page made is refused; set ADMIN_TOKEN to allow "
                            "this from a browser (without it only curl or scripts on this "
                            "machine may)")
        host = request.client_address[0] if request.client_address else ""
        if not is_loopback(host):
            raise forbidden("set ADMIN_TOKEN to allow this from other hosts; "
                            "without it only loopback clients may")


def _sent_by_a_web_page(request: Request) -> bool:
    """Whether a browser sent this for a page's script or form: browsers add `Origin` to
    every request but GET and HEAD, and `Sec-Fetch-Site` to every request, "none" only for
    what a person typed or bookmarked. Neither is in a request curl or a script makes."""
    headers = request.headers
    if "origin" in headers:
        return True
    site = dict.get(headers, "sec-fetch-site")  # any bytes: only its presence and ASCII matter
    return site is not None and site.strip().lower() != "none"
