"""aiohttp long-polling baseline for bench.realtime_bench (run: python aiohttp_broadcast.py PORT).

A plain `web.Application`: each GET /events awaits its own future, filed under each of the
caller's groups; POST /messages resolves every future of the group with one shared body.
The wire format is in broadcast.py.
"""

import asyncio
import sys

from aiohttp import web
from broadcast import Stream, empty_body, groups_of, wait_params

stream = Stream()
waiters: dict[int, set[asyncio.Future]] = {}
waiting = 0
JSON = "application/json"


def expire(fut: asyncio.Future, since: int) -> None:
    if not fut.done():
        fut.set_result(empty_body(since))


async def events(request: web.Request) -> web.Response:
    global waiting
    groups = groups_of(request.headers.get("Authorization"))
    if not groups:
        return web.Response(status=401, body=b'{"error":"unauthorized"}', content_type=JSON)
    since, timeout = wait_params(request.query.get("since"), request.query.get("timeout"))
    if since is None:
        return web.Response(body=empty_body(stream.cursor), content_type=JSON)
    fut = asyncio.get_running_loop().create_future()
    for g in groups:
        waiters.setdefault(g, set()).add(fut)
    timer = asyncio.get_running_loop().call_later(timeout, expire, fut, since)
    waiting += 1
    try:
        body = await fut
    finally:
        waiting -= 1
        timer.cancel()
        for g in groups:
            waiters.get(g, set()).discard(fut)
    return web.Response(body=body, content_type=JSON)


async def post_message(request: web.Request) -> web.Response:
    doc = await request.json()
    group_id = int(doc["groupId"])
    body, ack = stream.publish(group_id, str(doc["content"]))
    for fut in waiters.pop(group_id, ()):
        if not fut.done():
            fut.set_result(body)
    return web.Response(status=201, body=ack, content_type=JSON)


async def stats(request: web.Request) -> web.Response:
    return web.Response(body=stream.stats(waiting), content_type=JSON)


def main() -> None:
    app = web.Application()
    app.router.add_get("/events", events)
    app.router.add_post("/messages", post_message)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
