"""aiohttp long-polling baseline for bench.realtime_bench (run: python aiohttp_broadcast.py PORT).

A plain `web.Application`: each GET /events awaits its own future, filed under each of the
caller's groups; POST /messages resolves every future of the group with one shared body.
The wire format is in broadcast.py.
"""

import sys

from aiohttp import web
from broadcast import AsyncBroadcast, empty_body, groups_of, wait_params

hub = AsyncBroadcast()
JSON = "application/json"


async def events(request: web.Request) -> web.Response:
    groups = groups_of(request.headers.get("Authorization"))
    if not groups:
        return web.Response(status=401, body=b'{"error":"unauthorized"}', content_type=JSON)
    since, timeout = wait_params(request.query.get("since"), request.query.get("timeout"))
    if since is None:
        return web.Response(body=empty_body(hub.stream.cursor), content_type=JSON)
    return web.Response(body=await hub.wait(groups, since, timeout), content_type=JSON)


async def post_message(request: web.Request) -> web.Response:
    doc = await request.json()
    ack = hub.publish(int(doc["groupId"]), str(doc["content"]))
    return web.Response(status=201, body=ack, content_type=JSON)


async def stats(request: web.Request) -> web.Response:
    return web.Response(body=hub.stats(), content_type=JSON)


def main() -> None:
    app = web.Application()
    app.router.add_get("/events", events)
    app.router.add_post("/messages", post_message)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
