"""Users and tokens."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import text

from hachat.store import StoreError, UsernameTaken, accounts


def test_create_and_get_user(db):
    with db.write() as s:
        user = accounts.create_user(s, "Alice", "argon2-hash")
        assert user.id is not None  # flushed: the id is known inside the transaction
    with db.read() as s:
        assert accounts.get_user(s, user.id).username == "Alice"
        assert accounts.get_user(s, user.id + 1000) is None
        found = accounts.get_user_by_username(s, "Alice")
    assert found.id == user.id
    assert found.username == "Alice" and found.username_key == "alice"
    assert found.password_hash == "argon2-hash"


def test_usernames_are_case_insensitive(db):
    with db.write() as s:
        alice = accounts.create_user(s, "Alice", "h")
    with db.read() as s:
        for spelling in ("alice", "ALICE", "aLiCe"):
            assert accounts.get_user_by_username(s, spelling).id == alice.id
        assert accounts.get_user_by_username(s, "alicia") is None
    with pytest.raises(UsernameTaken) as info, db.write() as s:
        accounts.create_user(s, "ALICE", "h2")
    assert isinstance(info.value, StoreError)
    assert info.value.username == "ALICE"


def test_username_clash_leaves_transaction_usable(db):
    with db.write() as s:
        accounts.create_user(s, "bob", "h")
    with db.write() as s:
        with pytest.raises(UsernameTaken):
            accounts.create_user(s, "Bob", "h")
        carol = accounts.create_user(s, "carol", "h")
    with db.read() as s:
        assert accounts.get_user_by_username(s, "carol").id == carol.id


def test_unique_key_race_maps_to_username_taken(db, monkeypatch):
    """Even when the pre-check misses (a concurrent insert), the unique key decides."""
    with db.write() as s:
        accounts.create_user(s, "dave", "h")
    monkeypatch.setattr(accounts, "get_user_by_username", lambda _s, _u: None)
    with db.write() as s:
        with pytest.raises(UsernameTaken):
            accounts.create_user(s, "DAVE", "h")
        accounts.create_user(s, "erin", "h")  # the transaction is still usable
    monkeypatch.undo()
    with db.read() as s:
        assert accounts.get_user_by_username(s, "erin") is not None


def test_users_by_ids(db):
    with db.write() as s:
        a = accounts.create_user(s, "a", "h")
        b = accounts.create_user(s, "b", "h")
    with db.read() as s:
        found = accounts.users_by_ids(s, [b.id, a.id, a.id, 99999])
        assert [u.id for u in found] == [a.id, b.id]
        assert [u.username for u in found] == ["a", "b"]
        assert accounts.users_by_ids(s, set()) == []


def test_tokens_issue_lookup_revoke(db):
    with db.write() as s:
        user = accounts.create_user(s, "erin", "h")
        token = accounts.issue_token(s, user.id)
        other = accounts.issue_token(s, user.id)
    assert token != other and len(token) >= 40
    with db.read() as s:
        stored = s.execute(text("SELECT token_hash FROM auth_tokens ORDER BY id")).scalars().all()
        assert stored == [hashlib.sha256(t.encode()).hexdigest() for t in (token, other)]
        assert token not in stored
        assert accounts.user_for_token(s, token).id == user.id
        assert accounts.user_for_token(s, "not-a-token") is None
        assert accounts.user_for_token(s, "") is None
    with db.write() as s:
        assert accounts.revoke_token(s, token) == user.id
        assert accounts.revoke_token(s, token) is None
        assert accounts.revoke_token(s, "unknown") is None
    with db.read() as s:
        assert accounts.user_for_token(s, token) is None
        assert accounts.user_for_token(s, other).id == user.id
        revoked_at = s.execute(text("SELECT revoked_at FROM auth_tokens ORDER BY id")).scalars()
        first, second = revoked_at.all()
        assert first is not None and second is None
