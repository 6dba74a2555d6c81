"""The standard library's ThreadingHTTPServer with its defaults (run: python stdlib_server.py PORT).

Deliberately untuned, because its defaults are what people get: a listen backlog of 5
(`request_queue_size`), Nagle's algorithm left on, and the status line + headers written in one
send and the body in another. Only HTTP/1.1 is switched on, so that wrk's connections are kept
alive like with every other server measured.
"""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = b'{"status":"alive","active":true}'


class HealthHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server looks up
        if self.path != "/health":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep the base signature
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), HealthHandler)
    server.serve_forever()


if __name__ == "__main__":
    main()
