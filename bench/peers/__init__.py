"""Small baseline servers for bench.http_bench: each serves `GET /health` with the same JSON body.

Every server takes its port as the first command-line argument and listens on 127.0.0.1 only.
They are benchmark-only: nothing in hachat imports them.
"""

HEALTH_BODY = b'{"status":"alive","active":true}'
