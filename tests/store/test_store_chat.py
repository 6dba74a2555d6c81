"""Groups, memberships, messages."""

from __future__ import annotations

import threading

import pytest

from dbutil import post_one
from hachat.store import NotFound, StoreError, accounts, chat


@pytest.fixture
def users(db):
    with db.write() as s:
        return [accounts.create_user(s, name, "h") for name in ("ann", "ben", "cat", "dan")]


def test_create_group_adds_creator_and_dedupes(db, users):
    ann, ben, cat, _ = users
    with db.write() as s:
        group = chat.create_group(s, "Team", ann.id, [ben.id, cat.id, ben.id, ann.id])
    assert group.id is not None and group.name == "Team" and group.created_by == ann.id
    assert group.created_at.tzinfo is not None
    with db.read() as s:
        assert chat.member_ids(s, group.id) == sorted([ann.id, ben.id, cat.id])
        assert [u.username for u in chat.member_users(s, group.id)] == ["ann", "ben", "cat"]
        assert chat.get_group(s, group.id).name == "Team"
        assert chat.get_group(s, group.id + 100) is None


def test_create_group_with_only_the_creator(db, users):
    ann = users[0]
    with db.write() as s:
        group = chat.create_group(s, "Solo", ann.id, [])
    with db.read() as s:
        assert chat.member_ids(s, group.id) == [ann.id]


def test_create_group_unknown_user_is_not_found(db, users):
    ann = users[0]
    with pytest.raises(NotFound) as info, db.write() as s:
        chat.create_group(s, "Bad", ann.id, [ann.id, 99999, 88888])
    assert isinstance(info.value, StoreError)
    assert info.value.what == "user" and info.value.id == 88888
    with db.read() as s:
        assert chat.groups_of_user(s, ann.id) == []


def test_membership_queries(db, users):
    ann, ben, cat, dan = users
    with db.write() as s:
        g1 = chat.create_group(s, "one", ann.id, [ben.id])
        g2 = chat.create_group(s, "two", cat.id, [ann.id])
        g3 = chat.create_group(s, "three", ben.id, [])
    with db.read() as s:
        assert [g.id for g in chat.groups_of_user(s, ann.id)] == [g1.id, g2.id]
        assert [g.id for g in chat.groups_of_user(s, ben.id)] == [g1.id, g3.id]
        assert chat.group_ids_of_user(s, ann.id) == {g1.id, g2.id}
        assert chat.group_ids_of_user(s, dan.id) == set()
        assert chat.is_member(s, g1.id, ben.id) is True
        assert chat.is_member(s, g1.id, cat.id) is False
    with db.write() as s:
        assert chat.add_member(s, g1.id, cat.id) is True
        assert chat.add_member(s, g1.id, cat.id) is False
        assert chat.remove_member(s, g1.id, ben.id) is True
        assert chat.remove_member(s, g1.id, ben.id) is False
    with db.read() as s:
        assert chat.member_ids(s, g1.id) == [ann.id, cat.id]
        assert chat.group_ids_of_user(s, ben.id) == {g3.id}


def test_add_member_unknown_group_or_user(db, users):
    ann = users[0]
    with db.write() as s:
        group = chat.create_group(s, "g", ann.id, [])
    with pytest.raises(NotFound) as info, db.write() as s:
        chat.add_member(s, group.id + 100, ann.id)
    assert info.value.what == "group"
    with pytest.raises(NotFound) as info, db.write() as s:
        chat.add_member(s, group.id, 99999)
    assert (info.value.what, info.value.id) == ("user", 99999)


def test_create_get_delete_message(db, users):
    ann, ben, *_ = users
    with db.write() as s:
        group = chat.create_group(s, "g", ann.id, [ben.id])
        (result,) = chat.post_messages(s, [chat.MessageDraft(ben.id, group.id, "hello")], 3)
    message = result.message
    assert result.outcome is chat.PostOutcome.CREATED and message.id is not None
    assert (message.group_id, message.user_id, message.content, message.epoch) == \
        (group.id, ben.id, "hello", 3)
    assert message.client_message_id is None
    with db.read() as s:
        again = chat.get_message(s, message.id)
        assert again.content == "hello" and again.created_at.tzinfo is not None
    with db.write() as s:
        assert chat.delete_message(s, message.id) is True
        assert chat.delete_message(s, message.id) is False
    with db.read() as s:
        assert chat.get_message(s, message.id) is None


def test_post_message_is_idempotent_per_user_client_id(db, users):
    ann, ben, *_ = users
    with db.write() as s:
        group = chat.create_group(s, "g", ann.id, [ben.id])
        first, created1 = post_one(s, ann.id, group.id, "hi", 1, "c-1")
        again, created2 = post_one(s, ann.id, group.id, "hi (retry)", 1, "c-1")
        other_user, created3 = post_one(s, ben.id, group.id, "hi", 1, "c-1")
        no_id_1, _ = post_one(s, ann.id, group.id, "x", 1)
        no_id_2, _ = post_one(s, ann.id, group.id, "x", 1)
    assert created1 and not created2 and created3
    assert again.id == first.id and again.content == "hi"
    assert other_user.id != first.id
    assert no_id_1.id != no_id_2.id


def test_post_message_same_client_id_from_8_threads(db, users):
    ann, ben, *_ = users
    with db.write() as s:
        group = chat.create_group(s, "g", ann.id, [ben.id])
    barrier = threading.Barrier(8)
    results: list[tuple[int, bool]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        try:
            barrier.wait(10)
            with db.write() as s:
                message, created = post_one(s, ann.id, group.id, f"try {i}", 1,
                                            "same-client-id")
            with lock:
                results.append((message.id, created))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(results) == 8
    assert len({message_id for message_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with db.read() as s:
        assert len(chat.list_messages(s, group.id, None, 100)) == 1


def test_post_message_to_an_unknown_group_writes_nothing(db, users):
    with db.write() as s:
        (result,) = chat.post_messages(s, [chat.MessageDraft(users[0].id, 99999, "x", "cid")], 1)
    assert result.outcome is chat.PostOutcome.NO_GROUP


def test_list_messages_pagination(db, users):
    ann, ben, *_ = users
    with db.write() as s:
        group = chat.create_group(s, "g", ann.id, [ben.id])
        other = chat.create_group(s, "other", ann.id, [])
        ids = [post_one(s, ann.id, group.id, f"m{i}", 1)[0].id for i in range(7)]
        post_one(s, ann.id, other.id, "elsewhere", 1)
    with db.read() as s:
        page1 = chat.list_messages(s, group.id, None, 3)
        page2 = chat.list_messages(s, group.id, page1[-1].id, 3)
        page3 = chat.list_messages(s, group.id, page2[-1].id, 3)
        page4 = chat.list_messages(s, group.id, page3[-1].id, 3)
        assert chat.list_messages(s, group.id, None, 0) == []
    assert [m.id for m in page1] == ids[::-1][:3]
    assert [m.id for m in page2] == ids[::-1][3:6]
    assert [m.id for m in page3] == ids[:1]
    assert page4 == []
    assert [m.content for m in page1] == ["m6", "m5", "m4"]


# -- post_messages: many drafts, one transaction (the group commit's store half) ------------
def test_post_messages_gives_one_result_per_draft_in_order(db, users):
    ann, ben, cat, _ = users
    with db.write() as s:
        group = chat.create_group(s, "Batch", ann.id, [ben.id])
        other = chat.create_group(s, "Other", cat.id, [])
    drafts = [
        chat.MessageDraft(ann.id, group.id, "one", "k1"),
        chat.MessageDraft(cat.id, group.id, "not a member"),        # cat is not in the group
        chat.MessageDraft(ben.id, group.id, "two"),
        chat.MessageDraft(ann.id, 999_999, "no such group"),
        chat.MessageDraft(ann.id, group.id, "one", "k1"),           # same key in the batch
        chat.MessageDraft(ann.id, other.id, "not mine", "k2"),
        chat.MessageDraft(ben.id, group.id, "three", "k1"),         # same key, other author
    ]
    with db.write() as s:
        results = chat.post_messages(s, drafts, epoch=7)
    outcomes = [r.outcome for r in results]
    assert outcomes == [chat.PostOutcome.CREATED, chat.PostOutcome.NOT_MEMBER,
                        chat.PostOutcome.CREATED, chat.PostOutcome.NO_GROUP,
                        chat.PostOutcome.EXISTING, chat.PostOutcome.NOT_MEMBER,
                        chat.PostOutcome.CREATED]
    first, second, third = results[0].message, results[2].message, results[6].message
    assert results[4].message.id == first.id
    assert first.id < second.id < third.id
    assert all(r.message is None for r in (results[1], results[3], results[5]))
    with db.read() as s:
        stored = chat.list_messages(s, group.id)
        assert [(m.id, m.user_id, m.content, m.epoch, m.client_message_id) for m in stored] == [
            (third.id, ben.id, "three", 7, "k1"), (second.id, ben.id, "two", 7, None),
            (first.id, ann.id, "one", 7, "k1")]
        assert chat.list_messages(s, other.id) == []


def test_post_messages_finds_a_key_used_in_an_earlier_transaction(db, users):
    ann, ben, *_ = users
    with db.write() as s:
        group = chat.create_group(s, "Again", ann.id, [ben.id])
        earlier, _ = post_one(s, ann.id, group.id, "hi", 1, "key")
    with db.write() as s:
        (result,) = chat.post_messages(s, [chat.MessageDraft(ann.id, group.id, "hi", "key")], 2)
    assert result.outcome is chat.PostOutcome.EXISTING
    assert (result.message.id, result.message.epoch) == (earlier.id, 1)


def test_post_messages_of_nothing_touches_nothing(db):
    with db.write() as s:
        assert chat.post_messages(s, [], 1) == []


def test_a_deleted_messages_client_id_is_not_reused(db, users):
    ann, ben, *_ = users
    with db.write() as s:
        group = chat.create_group(s, "g", ann.id, [ben.id])
        first, _ = post_one(s, ann.id, group.id, "once", 1, "k-del")
        plain, _ = post_one(s, ann.id, group.id, "no key", 1)
    with db.write() as s:
        assert chat.delete_message(s, first.id) and chat.delete_message(s, plain.id)
    with db.write() as s:
        results = chat.post_messages(s, [chat.MessageDraft(ann.id, group.id, "once", "k-del"),
                                         chat.MessageDraft(ben.id, group.id, "his", "k-del")], 2)
    assert results[0].outcome is chat.PostOutcome.DELETED
    assert results[0].deleted_message_id == first.id
    assert results[1].outcome is chat.PostOutcome.CREATED  # keys are per author
    with db.read() as s:
        assert [m.content for m in chat.list_messages(s, group.id)] == ["his"]
    with db.write() as s:
        assert chat.prune_tombstones(s, 3600) == 0
        assert chat.prune_tombstones(s, -1) == 1  # everything counts as old
        (again,) = chat.post_messages(s, [chat.MessageDraft(ann.id, group.id, "once", "k-del")],
                                      3)
    assert again.outcome is chat.PostOutcome.CREATED


def test_a_retry_after_the_author_left_finds_the_earlier_message(db, users):
    """Regression: the membership verdict came before the idempotency lookup, so a retry
    after the author left the group was NOT_MEMBER although the message was stored."""
    ann, ben, *_ = users
    with db.write() as s:
        group = chat.create_group(s, "left", ben.id, [ann.id])
        kept, _ = post_one(s, ann.id, group.id, "kept", 1, "k-kept")
        gone, _ = post_one(s, ann.id, group.id, "gone", 1, "k-gone")
    with db.write() as s:
        assert chat.delete_message(s, gone.id)
        assert chat.remove_member(s, group.id, ann.id)
    with db.write() as s:
        results = chat.post_messages(s, [
            chat.MessageDraft(ann.id, group.id, "kept", "k-kept"),
            chat.MessageDraft(ann.id, group.id, "gone", "k-gone"),
            chat.MessageDraft(ann.id, group.id, "new", "k-new"),
            chat.MessageDraft(ann.id, group.id, "no key"),
            chat.MessageDraft(ann.id, 999_999, "kept", "k-kept"),
        ], 2)
    assert [r.outcome for r in results] == [
        chat.PostOutcome.EXISTING, chat.PostOutcome.DELETED, chat.PostOutcome.NOT_MEMBER,
        chat.PostOutcome.NOT_MEMBER, chat.PostOutcome.EXISTING]
    assert results[0].message.id == kept.id and results[4].message.id == kept.id
    assert results[1].deleted_message_id == gone.id
    with db.read() as s:
        assert [m.id for m in chat.list_messages(s, group.id)] == [kept.id]
