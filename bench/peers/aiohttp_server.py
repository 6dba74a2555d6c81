"""aiohttp baseline: a plain `web.Application` with one route (run: python aiohttp_server.py PORT)."""

import sys

from aiohttp import web

BODY = b'{"status":"alive","active":true}'


async def health(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
