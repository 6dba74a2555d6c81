"""uvicorn + starlette long-polling baseline for bench.realtime_bench. Run with uvicorn
(httptools, uvloop, one worker), e.g.

    python -m uvicorn --app-dir bench/peers starlette_broadcast:app --port PORT \
        --http httptools --loop uvloop --workers 1 --log-level warning --no-access-log

The same design as aiohttp_broadcast.py: a future per GET /events, filed under each of the
caller's groups; POST /messages resolves every future of the group with one shared body.
"""

import asyncio

from broadcast import Stream, empty_body, groups_of, wait_params
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

stream = Stream()
waiters: dict[int, set[asyncio.Future]] = {}
waiting = 0
JSON = "application/json"


def expire(fut: asyncio.Future, since: int) -> None:
    if not fut.done():
        fut.set_result(empty_body(since))


async def events(request: Request) -> Response:
    global waiting
    groups = groups_of(request.headers.get("authorization"))
    if not groups:
        return Response(b'{"error":"unauthorized"}', status_code=401, media_type=JSON)
    q = request.query_params
    since, timeout = wait_params(q.get("since"), q.get("timeout"))
    if since is None:
        return Response(empty_body(stream.cursor), media_type=JSON)
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
    return Response(body, media_type=JSON)


async def post_message(request: Request) -> Response:
    doc = await request.json()
    group_id = int(doc["groupId"])
    body, ack = stream.publish(group_id, str(doc["content"]))
    for fut in waiters.pop(group_id, ()):
        if not fut.done():
            fut.set_result(body)
    return Response(ack, status_code=201, media_type=JSON)


async def stats(request: Request) -> Response:
    return Response(stream.stats(waiting), media_type=JSON)


app = Starlette(routes=[Route("/events", events, methods=["GET"]),
                        Route("/messages", post_message, methods=["POST"]),
                        Route("/stats", stats, methods=["GET"])])
