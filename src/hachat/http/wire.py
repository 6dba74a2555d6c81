"""Bytes on the wire: response heads built from cached, pre-encoded pieces.

A response is written as ONE bytes object: status line, Content-Type, Content-Length, Date,
optional Connection, the application's headers, a blank line and the body.
"""

from __future__ import annotations

from email.utils import formatdate
from http import HTTPStatus

from hachat.http.messages import HTTPError, Response, dumps

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CONN_CLOSE = b"Connection: close\r\n"
CONN_KEEP_ALIVE = b"Connection: keep-alive\r\n"

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {}
# (status, content_type) -> b"HTTP/1.1 200 OK\r\nContent-Type: ...\r\nContent-Length: "
_PREFIXES: dict[tuple[int, str], bytes] = {}
_NO_BODY = frozenset({204, 304})


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status!r}")
        reason = _REASONS.get(status, "")
        line = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")
        _STATUS_LINES[status] = line
    return line


def _prefix(status: int, content_type: str) -> bytes:
    key = (status, content_type)
    prefix = _PREFIXES.get(key)
    if prefix is None:
        if not 200 <= status <= 999:
            raise ValueError(f"a final response needs a status of 200-999, not {status!r}")
        head = status_line(status)
        if content_type:
            _check_value(content_type)
            head += b"Content-Type: " + content_type.encode("latin-1") + b"\r\n"
        if status >= 200 and status not in _NO_BODY:
            head += b"Content-Length: "
        prefix = head
        if len(_PREFIXES) < 512:
            _PREFIXES[key] = prefix
    return prefix


def _check_value(text: str) -> None:
    if "\r" in text or "\n" in text:
        raise ValueError(f"header text must not contain CR or LF: {text!r}")


def date_line() -> bytes:
    """`Date: ...\\r\\n` for now (the server caches it per second)."""
    return b"Date: " + formatdate(usegmt=True).encode("ascii") + b"\r\n"


def extra_headers(headers: tuple[tuple[str, str], ...]) -> bytes:
    parts = []
    for name, value in headers:
        _check_value(name)
        _check_value(value)
        if not name or ":" in name:
            raise ValueError(f"invalid header name {name!r}")
        parts.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(parts)


def render(resp: Response, head_only: bool, conn_line: bytes, date: bytes) -> bytes:
    """The whole response as one bytes object. `conn_line` is b"", CONN_CLOSE or
    CONN_KEEP_ALIVE; `date` is the cached Date line."""
    status = resp.status
    body = resp.body
    prefix = _prefix(status, resp.content_type)
    if status in _NO_BODY:
        body = length = b""
    else:
        length = b"%d\r\n" % len(body)
    extra = extra_headers(resp.headers) if resp.headers else b""
    if head_only:
        body = b""
    return b"".join((prefix, length, date, conn_line, extra, b"\r\n", body))


def render_shared(resp: Response, conn_line: bytes, date: bytes) -> bytes:
    """`render(resp, False, conn_line, date)`, remembered on `resp` itself.

    For a response that goes out on many connections (a long-poll fan-out answers thousands of
    waiters with one Response): it is rendered once per distinct Connection line within the
    same Date second, and every connection sends the very same bytes object. The memo is keyed
    by the identity of `date` (the server swaps in a new Date line every second), so an answer
    never carries a stale Date. Loop thread only: the memo is not locked.
    """
    memo = resp._wire
    if memo is None or memo[0] is not date:
        memo = resp._wire = (date, {})
    data = memo[1].get(conn_line)
    if data is None:
        data = memo[1][conn_line] = render(resp, False, conn_line, date)
    return data


def error_response(status: int, code: str, message: str, *, close: bool = False) -> Response:
    return HTTPError(status, code, message, close=close).to_response()


INTERNAL_ERROR_BODY = dumps({"error": "internal_error", "message": "internal server error"})


def internal_error() -> Response:
    return Response(500, INTERNAL_ERROR_BODY, "application/json")
