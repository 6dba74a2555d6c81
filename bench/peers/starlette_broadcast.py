"""uvicorn + starlette long-polling baseline for bench.realtime_bench. Run with uvicorn
(httptools, uvloop, one worker), e.g.

    python -m uvicorn --app-dir bench/peers starlette_broadcast:app --port PORT \
        --http httptools --loop uvloop --workers 1 --log-level warning --no-access-log

The same design as aiohttp_broadcast.py: a future per GET /events, filed under each of the
caller's groups; POST /messages resolves every future of the group with one shared body.
"""

from broadcast import AsyncBroadcast, empty_body, groups_of, wait_params
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

hub = AsyncBroadcast()
JSON = "application/json"


async def events(request: Request) -> Response:
    groups = groups_of(request.headers.get("authorization"))
    if not groups:
        return Response(b'{"error":"unauthorized"}', status_code=401, media_type=JSON)
    q = request.query_params
    since, timeout = wait_params(q.get("since"), q.get("timeout"))
    if since is None:
        return Response(empty_body(hub.stream.cursor), media_type=JSON)
    return Response(await hub.wait(groups, since, timeout), media_type=JSON)


async def post_message(request: Request) -> Response:
    doc = await request.json()
    ack = hub.publish(int(doc["groupId"]), str(doc["content"]))
    return Response(ack, status_code=201, media_type=JSON)


async def stats(request: Request) -> Response:
    return Response(hub.stats(), media_type=JSON)


app = Starlette(routes=[Route("/events", events, methods=["GET"]),
                        Route("/messages", post_message, methods=["POST"]),
                        Route("/stats", stats, methods=["GET"])])
