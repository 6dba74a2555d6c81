"""Small baseline servers for the benchmarks. Nothing in hachat imports them.

- bench.http_bench: aiohttp_server.py, starlette_app.py, waitress_server.py, stdlib_server.py
  serve `GET /health` with the same JSON body.
- bench.realtime_bench: aiohttp_broadcast.py, starlette_broadcast.py, waitress_broadcast.py
  are long-polling broadcast servers (`GET /events`, `POST /messages`, `GET /stats`) sharing
  the wire format of broadcast.py.

Every server takes its port as the first command-line argument (or is run by uvicorn) and
listens on 127.0.0.1 only.
"""

HEALTH_BODY = b'{"status":"alive","active":true}'
