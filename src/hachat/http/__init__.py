"""The socket HTTP/1.1 layer: accepting, connections, parsing (httptools), workers, parking.

It knows nothing of chat. An application gives it `resolve(request) -> Handler`; a handler
returns a `Response` now or a `Deferred` that is answered later (long-polls).
"""

from hachat.http.messages import (
    Application,
    Deferred,
    Handler,
    Headers,
    HTTPError,
    LoopHandle,
    Request,
    Response,
    json_response,
)

__all__ = [
    "Application",
    "Deferred",
    "HTTPError",
    "Handler",
    "Headers",
    "LoopHandle",
    "Request",
    "Response",
    "json_response",
]
