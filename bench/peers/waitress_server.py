"""waitress baseline: a WSGI callable served with waitress's defaults (4 threads).

Run: python waitress_server.py PORT
"""

import logging
import sys

from waitress import serve

BODY = b'{"status":"alive","active":true}'
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    if environ["PATH_INFO"] != "/health":
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("200 OK", HEADERS)
    return [BODY]


def main() -> None:
    # waitress warns "Task queue depth is N" under load; that is the load, not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    serve(app, host="127.0.0.1", port=int(sys.argv[1]), _quiet=True)


if __name__ == "__main__":
    main()
