"""The Authenticator on its own, against a real database: the token cache must never bring a
revoked token back, and rate limits key on an address the client cannot choose."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hachat.api.auth import Authenticator
from hachat.http.messages import HTTPError, Request
from hachat.store import Database, accounts
from support import fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path: Path) -> Iterator[Database]:
    with fresh_database(request.param, tmp_path) as url:
        database = Database(url, pool_size=4)
        try:
            database.upgrade()
            yield database
        finally:
            database.dispose()


def _request(token: str | None = None, peer: str = "127.0.0.1",
             headers: dict[str, str] | None = None) -> Request:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["authorization"] = f"Bearer {token}"
    return Request("GET", "/chats", "/chats", "", hdrs, b"", "1.1", (peer, 40000))


class PausingReads:
    """The real database, but the next read pauses after it has finished (the transaction is
    over, the answer is in hand) until `go` is set: a seam to interleave a logout."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.read_done = threading.Event()
        self.go = threading.Event()

    @contextmanager
    def read(self):
        with self._db.read() as session:
            yield session
        self.read_done.set()
        assert self.go.wait(10), "the test never released the paused read"


def _new_token(db: Database, name: str) -> str:
    with db.write() as s:
        user = accounts.create_user(s, name, "hash")
        return accounts.issue_token(s, user.id)


def _logout(auth: Authenticator, db: Database, token: str) -> None:
    """What POST /logout does: revoke in the database, then evict from the cache."""
    with db.write() as s:
        assert accounts.revoke_token(s, token)
    auth.forget(token)


def test_a_logout_between_the_lookup_and_the_cache_fill_wins(db):
    auth = Authenticator(admin_token=None)
    token = _new_token(db, "racer")
    paused = PausingReads(db)
    outcome: list[object] = []
    reader = threading.Thread(
        target=lambda: outcome.append(auth.principal(_request(token), paused)))
    reader.start()
    assert paused.read_done.wait(10)
    # The lookup saw a live token; the logout now completes before it fills the cache.
    _logout(auth, db, token)
    paused.go.set()
    reader.join(10)
    assert len(outcome) == 1  # that request raced the logout: either answer is fair
    with pytest.raises(HTTPError) as info:
        auth.principal(_request(token), db)
    assert info.value.status == 401


def test_a_cache_clear_between_the_lookup_and_the_cache_fill_wins(db):
    """`clear()` (this node became active again; another node may have revoked tokens) also
    invalidates lookups already in flight."""
    auth = Authenticator(admin_token=None)
    token = _new_token(db, "clearer")
    paused = PausingReads(db)
    reader = threading.Thread(target=lambda: auth.principal(_request(token), paused))
    reader.start()
    assert paused.read_done.wait(10)
    with db.write() as s:  # revoked elsewhere: this process never called forget()
        assert accounts.revoke_token(s, token)
    auth.clear()
    paused.go.set()
    reader.join(10)
    with pytest.raises(HTTPError) as info:
        auth.principal(_request(token), db)
    assert info.value.status == 401


def test_live_tokens_are_cached_and_logout_evicts(db):
    auth = Authenticator(admin_token=None)
    token = _new_token(db, "plain")
    assert auth.principal(_request(token), db).username == "plain"
    # Served from the cache now: even a read that would pause is never made.
    paused = PausingReads(db)
    paused.go.set()
    assert auth.principal(_request(token), paused).username == "plain"
    assert not paused.read_done.is_set()
    _logout(auth, db, token)
    with pytest.raises(HTTPError):
        auth.principal(_request(token), db)


def test_many_logouts_do_not_stop_caching_other_tokens(db):
    """The record of revoked tokens is bounded, and an overflow only costs cache fills of
    lookups that were in flight across it."""
    auth = Authenticator(admin_token=None, revoked_size=4)
    tokens = [_new_token(db, f"many{i}") for i in range(8)]
    for token in tokens[:6]:
        _logout(auth, db, token)
    paused = PausingReads(db)
    paused.go.set()
    assert auth.principal(_request(tokens[7]), paused).username == "many7"
    assert paused.read_done.is_set()
    for token in tokens[:6]:
        with pytest.raises(HTTPError):
            auth.principal(_request(token), db)
    # Cached now: no database read the second time.
    again = PausingReads(db)
    again.go.set()
    assert auth.principal(_request(tokens[7]), again).username == "many7"
    assert not again.read_done.is_set()


@pytest.mark.parametrize("peer,forwarded,key", [
    # no proxy header: the peer
    ("198.51.100.7", None, "198.51.100.7"),
    # a remote peer is not a proxy we trust: whatever it claims is ignored
    ("198.51.100.7", "203.0.113.1", "198.51.100.7"),
    ("198.51.100.7", "127.0.0.1", "198.51.100.7"),
    # a local proxy (HAProxy) appends the address it saw: the last value is the one to trust
    ("127.0.0.1", "203.0.113.1", "203.0.113.1"),
    ("127.0.0.1", "10.9.9.9, 203.0.113.1", "203.0.113.1"),
    ("127.0.0.1", "10.9.9.9,203.0.113.1", "203.0.113.1"),
    # IPv6 counts by /64: one host may use any address of its /64
    ("::1", "1.2.3.4, 2001:db8::1", "2001:db8::/64"),
    ("2001:db8:0:1:aaaa::5", None, "2001:db8:0:1::/64"),
    ("::ffff:198.51.100.7", None, "198.51.100.7"),
    ("::ffff:127.0.0.1", "1.2.3.4, 203.0.113.1", "203.0.113.1"),
    # a last value that is no address: the proxy itself is the key
    ("127.0.0.1", "203.0.113.1, not-an-address", "127.0.0.1"),
    ("127.0.0.1", "203.0.113.1, ", "127.0.0.1"),
])
def test_rate_limit_key(peer, forwarded, key):
    headers = {"x-forwarded-for": forwarded} if forwarded is not None else {}
    assert Authenticator.client_key(_request(peer=peer, headers=headers)) == key
