"""uvicorn + starlette baseline. Run with uvicorn (httptools, uvloop, one worker), e.g.

    python -m uvicorn --app-dir bench/peers starlette_app:app --port PORT \
        --http httptools --loop uvloop --workers 1 --log-level warning --no-access-log
"""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BODY = b'{"status":"alive","active":true}'


async def health(request: Request) -> Response:
    return Response(BODY, media_type="application/json")


app = Starlette(routes=[Route("/health", health, methods=["GET"])])
