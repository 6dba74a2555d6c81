"""The events that flow through the realtime hub (one row of the `events` table each)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """A committed event. `position` is its stream position (the client's cursor).

    An event reaches a long-poll waiter when `group_id` is one of the waiter's groups or
    `target_user_id` is the waiter's user. Treat `payload` as read-only: the same object is
    shared by every waiter and by the hub's replay buffer.
    """

    position: int
    kind: str
    group_id: int | None
    target_user_id: int | None
    payload: dict | None  # None: stored data that could not be read back
    created_at: str

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.position,
            "type": self.kind,
            "groupId": self.group_id,
            "data": self.payload,
            "createdAt": self.created_at,
        }
        if self.payload is None:  # stored data that could not be read back
            obj["unreadable"] = True
        if self.target_user_id is not None:
            obj["userId"] = self.target_user_id
        return obj
