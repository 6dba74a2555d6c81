"""Users and bearer tokens. Every function takes a Session from `Database.read()`/`.write()`."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .errors import UsernameTaken
from .models import AuthToken, User, utcnow

__all__ = ["UsernameTaken", "create_user", "get_user", "get_user_by_username", "hash_token",
           "issue_token", "revoke_token", "user_for_token", "username_key", "users_by_ids"]


def username_key(username: str) -> str:
    """The form usernames are compared in (case-insensitive)."""
    return username.lower()


def hash_token(raw: str) -> str:
    """What is stored for a token: sha256 hex. The raw token is never stored."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def get_user(s: Session, user_id: int) -> User | None:
    return s.get(User, user_id)


def get_user_by_username(s: Session, username: str) -> User | None:
    return s.scalars(select(User).where(User.username_key == username_key(username))).first()


def create_user(s: Session, username: str, password_hash: str) -> User:
    """Insert a user (username kept as given); raise `UsernameTaken` if the key exists.

    Uses a SAVEPOINT so the caller's transaction stays usable after a clash.
    """
    if get_user_by_username(s, username) is not None:
        raise UsernameTaken(username)
    user = User(username=username, username_key=username_key(username),
                password_hash=password_hash, created_at=utcnow())
    try:
        with s.begin_nested():
            s.add(user)
            s.flush()
    except IntegrityError:
        raise UsernameTaken(username) from None
    return user


def users_by_ids(s: Session, ids: Iterable[int]) -> list[User]:
    """The users among `ids` that exist (unknown ids and duplicates dropped), ordered by id."""
    wanted = {int(i) for i in ids}
    if not wanted:
        return []
    return list(s.scalars(select(User).where(User.id.in_(wanted)).order_by(User.id)))


def issue_token(s: Session, user_id: int) -> str:
    """Create a bearer token for the user; return the raw token (shown once, never stored)."""
    raw = secrets.token_urlsafe(32)
    s.add(AuthToken(user_id=user_id, token_hash=hash_token(raw), created_at=utcnow()))
    s.flush()
    return raw


def user_for_token(s: Session, raw: str) -> User | None:
    """The user a live (not revoked) token belongs to."""
    if not raw:
        return None
    return s.scalars(
        select(User)
        .join(AuthToken, AuthToken.user_id == User.id)
        .where(AuthToken.token_hash == hash_token(raw), AuthToken.revoked_at.is_(None))
    ).first()


def revoke_token(s: Session, raw: str) -> int | None:
    """Revoke a live token: the id of the user it belonged to, or None if it is unknown or
    already revoked (then nothing changes)."""
    live = (AuthToken.token_hash == hash_token(raw), AuthToken.revoked_at.is_(None))
    user_id = s.scalars(select(AuthToken.user_id).where(*live)).first()
    if user_id is None:
        return None
    result = s.execute(
        update(AuthToken)
        .where(*live)
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    # A concurrent logout of the same token may have won between the two statements.
    return user_id if result.rowcount == 1 else None
