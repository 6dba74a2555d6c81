"""Event: the wire form."""

from __future__ import annotations

import dataclasses

import pytest

from hachat.realtime import Event


def test_to_json_obj_without_target_user():
    e = Event(12, "message.created", 3, None, {"id": 5, "text": "hi"}, "2024-05-01T10:00:00Z")
    assert e.to_json_obj() == {"id": 12, "type": "message.created", "groupId": 3,
                               "data": {"id": 5, "text": "hi"},
                               "createdAt": "2024-05-01T10:00:00Z"}


def test_to_json_obj_with_target_user():
    e = Event(13, "member.added", 3, 9, {}, "2024-05-01T10:00:01Z")
    assert e.to_json_obj()["userId"] == 9
    assert e.to_json_obj()["groupId"] == 3


def test_event_is_frozen_with_slots():
    e = Event(1, "k", None, 2, {}, "t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.position = 2  # type: ignore[misc]
    assert not hasattr(e, "__dict__")
