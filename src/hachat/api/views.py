"""How stored rows look in JSON answers."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def user_view(user: Any) -> dict[str, Any]:
    return {"id": user.id, "username": user.username}


def group_view(group: Any) -> dict[str, Any]:
    return {"id": group.id, "name": group.name, "createdBy": group.created_by,
            "createdAt": iso(group.created_at)}


def message_view(message: Any, username: str | None) -> dict[str, Any]:
    return {
        "id": message.id,
        "groupId": message.group_id,
        "userId": message.user_id,
        "username": username,
        "content": message.content,
        "createdAt": iso(message.created_at),
        "epoch": message.epoch,
        "clientMessageId": message.client_message_id,
    }
