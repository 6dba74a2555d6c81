"""Groups, memberships and messages. Every function takes a Session from `Database`.

Authorization (is the caller a member?) is the caller's job; these functions only keep the
data consistent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import rawsql
from .errors import NotFound
from .models import Group, Membership, Message, MessageTombstone, User, utcnow

__all__ = ["MessageDraft", "NotFound", "PostOutcome", "PostResult", "add_member", "create_group", "delete_message",
           "get_group", "get_message", "group_ids_of_user", "groups_of_user", "is_member",
           "list_messages", "member_ids", "member_users", "post_messages", "prune_tombstones", "remove_member"]


def _require_users(s: Session, user_ids: Iterable[int]) -> None:
    wanted = sorted({int(i) for i in user_ids})
    if not wanted:
        return
    found = set(s.scalars(select(User.id).where(User.id.in_(wanted))))
    for user_id in wanted:
        if user_id not in found:
            raise NotFound("user", user_id)


def create_group(s: Session, name: str, creator_id: int, member_ids: Iterable[int]) -> Group:
    """Create a group; the creator is always a member, duplicates are ignored.

    Raises `NotFound(what="user", id=...)` for the smallest unknown user id.
    """
    members = {int(i) for i in member_ids}
    members.add(int(creator_id))
    _require_users(s, members)
    now = utcnow()
    group = Group(name=name, created_by=int(creator_id), created_at=now)
    s.add(group)
    s.flush()
    s.add_all(Membership(group_id=group.id, user_id=uid, added_at=now) for uid in sorted(members))
    s.flush()
    return group


def get_group(s: Session, group_id: int) -> Group | None:
    return s.get(Group, group_id)


def is_member(s: Session, group_id: int, user_id: int) -> bool:
    return s.scalar(
        select(Membership.user_id)
        .where(Membership.group_id == group_id, Membership.user_id == user_id)
    ) is not None


def add_member(s: Session, group_id: int, user_id: int) -> bool:
    """Add a member; False if already one. Raises NotFound for an unknown group or user."""
    if is_member(s, group_id, user_id):
        return False
    if s.get(Group, group_id) is None:
        raise NotFound("group", group_id)
    _require_users(s, [user_id])
    try:
        with s.begin_nested():
            s.add(Membership(group_id=group_id, user_id=user_id, added_at=utcnow()))
            s.flush()
    except IntegrityError:
        if is_member(s, group_id, user_id):  # a concurrent add won the race
            return False
        raise
    return True


def remove_member(s: Session, group_id: int, user_id: int) -> bool:
    """Remove a member; False if not one."""
    result = s.execute(
        delete(Membership)
        .where(Membership.group_id == group_id, Membership.user_id == user_id)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def groups_of_user(s: Session, user_id: int) -> list[Group]:
    return list(s.scalars(
        select(Group)
        .join(Membership, Membership.group_id == Group.id)
        .where(Membership.user_id == user_id)
        .order_by(Group.id)
    ))


def group_ids_of_user(s: Session, user_id: int) -> set[int]:
    return set(s.scalars(select(Membership.group_id).where(Membership.user_id == user_id)))


def member_users(s: Session, group_id: int) -> list[User]:
    return list(s.scalars(
        select(User)
        .join(Membership, Membership.user_id == User.id)
        .where(Membership.group_id == group_id)
        .order_by(User.id)
    ))


def member_ids(s: Session, group_id: int) -> list[int]:
    return list(s.scalars(
        select(Membership.user_id).where(Membership.group_id == group_id)
        .order_by(Membership.user_id)
    ))


def _message_by_client_id(s: Session, user_id: int, client_message_id: str) -> Message | None:
    return s.scalars(
        select(Message)
        .where(Message.user_id == user_id, Message.client_message_id == client_message_id)
        .execution_options(populate_existing=True)
    ).first()


@dataclass(frozen=True, slots=True)
class MessageDraft:
    """A message someone asked to post, not yet checked against the database."""

    user_id: int
    group_id: int
    content: str
    client_message_id: str | None = None


class PostOutcome(Enum):
    """What became of one draft in `post_messages`."""

    CREATED = "created"          # a new row
    EXISTING = "existing"        # the client message id was used before: that row
    NO_GROUP = "no_group"        # the group does not exist
    NOT_MEMBER = "not_member"    # the author does not belong to the group
    DELETED = "deleted"          # the client message id belonged to a message deleted since


@dataclass(frozen=True, slots=True)
class PostResult:
    outcome: PostOutcome
    message: Message | None = None
    deleted_message_id: int | None = None  # with DELETED


# The membership check and the insert in one statement: a non-member inserts nothing, and
# neither does a client message id already used (a live message: the unique key; a deleted
# one: its tombstone).
_INSERT_IF_MEMBER = (
    "INSERT INTO messages (group_id, user_id, content, created_at, epoch, client_message_id) "
    "SELECT m.group_id, m.user_id, CAST(:content AS TEXT), :created_at, :epoch, "
    "CAST(:client_message_id AS TEXT) "
    "FROM memberships m WHERE m.group_id = :group_id AND m.user_id = :user_id "
    "AND NOT EXISTS (SELECT 1 FROM message_tombstones t WHERE t.user_id = m.user_id "
    "AND t.client_message_id = CAST(:client_message_id AS TEXT)) "
    "ON CONFLICT (user_id, client_message_id) DO NOTHING RETURNING id"
)


def post_messages(s: Session, drafts: Sequence[MessageDraft], epoch: int) -> list[PostResult]:
    """Insert many messages in the session's transaction, each only if its author belongs to
    its group; one result per draft, in order.

    Idempotent per (author, client message id), also between drafts of the same call, after
    the message was deleted (its tombstone answers), and after its author left the group (the
    key is looked up before membership is judged). On PostgreSQL the inserts go to the server
    as one pipelined batch (one round trip, not one per message); the rare drafts that insert
    nothing are then told apart (an earlier message, no group, not a member) one by one.
    """
    if not drafts:
        return []
    dialect = rawsql.dialect_of(s)
    now = utcnow()
    stamp = rawsql.timestamp_param(now, dialect)
    params = [{"group_id": d.group_id, "user_id": d.user_id, "content": d.content,
               "created_at": stamp, "epoch": int(epoch),
               "client_message_id": d.client_message_id} for d in drafts]
    new_ids = rawsql.insert_many_returning(s, _INSERT_IF_MEMBER, params)
    results: list[PostResult] = []
    for draft, new_id in zip(drafts, new_ids, strict=True):
        if new_id is not None:
            results.append(PostResult(PostOutcome.CREATED, Message(
                id=new_id, group_id=draft.group_id, user_id=draft.user_id,
                content=draft.content, created_at=now, epoch=int(epoch),
                client_message_id=draft.client_message_id)))
            continue
        # The key first: a retry of a message already stored (or deleted since) gets that
        # answer even if its author has left the group (or the group is gone) meanwhile.
        earlier = _earlier_use(s, draft)
        if earlier is not None:
            results.append(earlier)
            continue
        group, member = membership(s, draft.group_id, draft.user_id)
        if group is None:
            results.append(PostResult(PostOutcome.NO_GROUP))
        elif not member:
            results.append(PostResult(PostOutcome.NOT_MEMBER))
        else:
            raise IntegrityError("INSERT messages", {},
                                 Exception("nothing inserted, no earlier use"))
    return results


_MEMBERSHIP = (
    "SELECT g.id, g.name, g.created_by, g.created_at, m.user_id FROM chat_groups g "
    "LEFT JOIN memberships m ON m.group_id = g.id AND m.user_id = :user_id "
    "WHERE g.id = :group_id"
)


def membership(s: Session, group_id: int, user_id: int) -> tuple[Group | None, bool]:
    """The group (None if it does not exist) and whether the user belongs to it: one query."""
    row = rawsql.run(s, _MEMBERSHIP, {"group_id": group_id, "user_id": user_id}).first()
    if row is None:
        return None, False
    group = Group(id=row[0], name=row[1], created_by=row[2],
                  created_at=rawsql.timestamp_result(row[3]))
    return group, row[4] is not None


def _earlier_use(s: Session, draft: MessageDraft) -> PostResult | None:
    """An insert did nothing: the message its client message id was used for (EXISTING), or
    the tombstone of that message (DELETED), or None (no key, or an unused one)."""
    if draft.client_message_id is None:
        return None
    existing = _message_by_client_id(s, draft.user_id, draft.client_message_id)
    if existing is not None:
        return PostResult(PostOutcome.EXISTING, existing)
    tomb = s.get(MessageTombstone, (draft.user_id, draft.client_message_id))
    if tomb is not None:
        return PostResult(PostOutcome.DELETED, deleted_message_id=tomb.message_id)
    return None


def get_message(s: Session, message_id: int) -> Message | None:
    return s.get(Message, message_id)


def delete_message(s: Session, message_id: int) -> bool:
    """Delete a message row; False if there was none. Its client message id, if any, is kept
    as a tombstone. (Redact its events separately with `events.redact_message_events`.)"""
    # Default synchronize_session: a loaded copy in this session is marked deleted too.
    row = s.execute(delete(Message).where(Message.id == message_id)
                    .returning(Message.user_id, Message.client_message_id)).first()
    if row is None:
        return False
    if row.client_message_id is not None:
        s.add(MessageTombstone(user_id=row.user_id, client_message_id=row.client_message_id,
                               message_id=message_id, deleted_at=utcnow()))
        s.flush()
    return True


def prune_tombstones(s: Session, older_than_seconds: float) -> int:
    """Forget the idempotency keys of messages deleted more than `older_than_seconds` ago."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    result = s.execute(delete(MessageTombstone).where(MessageTombstone.deleted_at < cutoff)
                       .execution_options(synchronize_session=False))
    return int(result.rowcount)


def list_messages(s: Session, group_id: int, before: int | None = None,
                  limit: int = 50) -> list[Message]:
    """Newest first; only ids < `before` when given."""
    query = select(Message).where(Message.group_id == group_id)
    if before is not None:
        query = query.where(Message.id < before)
    return list(s.scalars(query.order_by(Message.id.desc()).limit(max(0, int(limit)))))
