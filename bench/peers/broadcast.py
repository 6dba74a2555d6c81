"""What the long-polling peers of bench.realtime_bench share: the wire format, and the
waiters of the two asyncio peers (`AsyncBroadcast`); no server.

Each peer (aiohttp_broadcast.py, starlette_broadcast.py, waitress_broadcast.py) serves

    GET  /events?since=<cursor>&timeout=<s>   parks until a message to one of the caller's
                                              groups, or answers {"events":[],"cursor":since}
                                              after `timeout` (<= 60 s)
    POST /messages {"groupId", "content"}     resolves every waiter of the group with one
                                              shared answer body, then answers 201
    GET  /stats                               {"waiters": requests parked now, "cursor": n}

There is no account database: the bearer token *is* the caller's list of group ids
("1,2,3"), so a peer does less per request than hachat, which looks the token up. `since` is
only echoed: a peer keeps no history (the benchmark parks every waiter before it posts).
The answer is the document hachat sends for a new message, about the same size.
"""

from __future__ import annotations

import asyncio
import json
import time

MAX_TIMEOUT = 60.0
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def groups_of(authorization: str | None) -> list[int]:
    """The group ids a bearer token names ("Bearer 1,2,3" -> [1, 2, 3]); [] when malformed."""
    if not authorization or not authorization.startswith("Bearer "):
        return []
    try:
        return [int(g) for g in authorization[7:].split(",")]
    except ValueError:
        return []


def wait_params(since: str | None, timeout: str | None) -> tuple[int | None, float]:
    """(since or None, timeout in seconds capped at MAX_TIMEOUT) from the query's strings."""
    try:
        seconds = min(float(timeout), MAX_TIMEOUT) if timeout is not None else 25.0
        return (int(since) if since is not None else None), max(0.0, seconds)
    except ValueError:
        return None, 0.0


def empty_body(cursor: int) -> bytes:
    return b'{"events":[],"cursor":%d}' % cursor


class Stream:
    """The cursor and message counter of one peer process (no history is kept)."""

    def __init__(self) -> None:
        self.cursor = 0
        self.message_id = 0

    def publish(self, group_id: int, content: str) -> tuple[bytes, bytes]:
        """(the answer body every waiter of the group gets, the POST's 201 body)."""
        self.cursor += 1
        self.message_id += 1
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000000Z"
        message = {"id": self.message_id, "groupId": group_id, "userId": 1,
                   "username": "poster", "content": content, "createdAt": now, "epoch": 1,
                   "clientMessageId": None}
        event = {"id": self.cursor, "type": "message.created", "groupId": group_id,
                 "data": message, "createdAt": now}
        body = _dumps({"events": [event], "cursor": self.cursor}).encode()
        return body, _dumps(message).encode()

    def stats(self, waiters: int, **more: int) -> bytes:
        return _dumps({"waiters": waiters, "cursor": self.cursor, **more}).encode()


class AsyncBroadcast:
    """The asyncio peers' state (aiohttp, starlette): a future per parked GET /events, filed
    under each of the caller's groups, with a loop timer for its timeout."""

    def __init__(self) -> None:
        self.stream = Stream()
        self.waiters: dict[int, set[asyncio.Future]] = {}
        self.waiting = 0

    async def wait(self, groups: list[int], since: int, timeout: float) -> bytes:
        """The body to answer a parked GET /events with: the next message to one of
        `groups`, or the empty answer once `timeout` passes."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        for g in groups:
            self.waiters.setdefault(g, set()).add(fut)
        timer = loop.call_later(timeout, _expire, fut, since)
        self.waiting += 1
        try:
            return await fut
        finally:
            self.waiting -= 1
            timer.cancel()
            for g in groups:
                self.waiters.get(g, set()).discard(fut)

    def publish(self, group_id: int, content: str) -> bytes:
        """Wake every waiter of the group with one shared body; the POST's 201 body."""
        body, ack = self.stream.publish(group_id, content)
        for fut in self.waiters.pop(group_id, ()):
            if not fut.done():
                fut.set_result(body)
        return ack

    def stats(self) -> bytes:
        return self.stream.stats(self.waiting)


def _expire(fut: asyncio.Future, since: int) -> None:
    if not fut.done():
        fut.set_result(empty_body(since))
