"""One client connection: an explicit state machine around `httptools.HttpRequestParser`.

Everything here runs on the loop thread, except `_run_blocking` (a worker thread), which only
calls the handler and hands the result back with `call_soon_threadsafe`.

Requests are parsed ahead (pipelining) into `_pending`, but handled one at a time and answered
strictly in order; reading pauses while 32 of them, or 64 KiB of them, wait. After a request
that breaks the rules nothing more is parsed: the requests before it are answered, then the
error (with `Connection: close`), then the connection closes.

End of input (the client's FIN) means the client will send nothing more, not that it stopped
reading: a client may half-close (`shutdown(SHUT_WR)`) once its request is out, and curl,
HAProxy or a script may do so. So every request it sent whole is still answered, the last one
with `Connection: close`, and then the connection closes (`_on_eof`). Parked requests, a
`working` one (a message being committed) as much as a long-poll, wait for their answer as
usual. TCP shows a full close as the same FIN; to tell the two apart while a request is in
progress the server sends an interim `100 Continue` (`_probe`): a socket that was closed for
good answers it with a reset, and the connection is closed at once, its parked request cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from collections import deque
from enum import Enum
from functools import partial
from time import monotonic
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, parse_url

from hachat.http.loop import EV_ERR, EV_HUP, EV_READ, EV_WRITE
from hachat.http.messages import Deferred, Headers, HTTPError, Request, Response
from hachat.http.wire import (
    CONN_CLOSE,
    CONN_KEEP_ALIVE,
    CONTINUE,
    internal_error,
    render,
    render_shared,
)

if TYPE_CHECKING:
    from hachat.http.server import HTTPServer

log = logging.getLogger("hachat.http")

PIPELINE_MAX = 32  # parsed-ahead requests per connection before we stop reading
PIPELINE_RESUME = 8
# ... or parsed-ahead bytes (bodies and header blocks): 32 requests of MAX_BODY_BYTES each
# would hold megabytes per connection.
PIPELINE_MAX_BYTES = 64 * 1024
LINGER_SECONDS = 2.0  # after an error response: wait this long for the client's FIN
LINGER_MAX_BYTES = 1 << 20  # ... discarding at most this much input
CHUNK_LINE_MAX = 4096  # a chunk-size line (with any extensions) the server reads, at most
PROBE_CHECK = 0.05  # selectors fallback: first look for a reset this long after a probe


class ConnState(Enum):
    IDLE = 0  # no request in progress; waiting for the first byte of the next one
    READING = 1  # part of a request has arrived (headers or body incomplete)
    HANDLING = 2  # a complete request is with its handler (inline or on a worker)
    PARKED = 3  # the handler returned a Deferred: waiting for resolve / timeout / cancel
    WRITING = 4  # a response is partly sent; the rest waits for the socket
    CLOSING = 5  # the last response is going out; then input is drained until FIN
    CLOSED = 6

    def __init__(self, value: int) -> None:
        self.bit = 1 << value
        self.allowed = 0  # filled from TRANSITIONS below


S = ConnState
# Every allowed transition, in one place.
TRANSITIONS: dict[ConnState, tuple[ConnState, ...]] = {
    S.IDLE: (S.IDLE, S.READING, S.HANDLING, S.CLOSING, S.CLOSED),
    S.READING: (S.READING, S.HANDLING, S.CLOSING, S.CLOSED),
    S.HANDLING: (S.HANDLING, S.PARKED, S.WRITING, S.IDLE, S.READING, S.CLOSING, S.CLOSED),
    S.PARKED: (S.HANDLING, S.CLOSED),
    S.WRITING: (S.HANDLING, S.IDLE, S.READING, S.CLOSING, S.CLOSED),
    S.CLOSING: (S.CLOSED,),
    S.CLOSED: (),
}
for _state, _targets in TRANSITIONS.items():
    _state.allowed = sum(t.bit for t in _targets)

IDLE, READING, HANDLING, PARKED, WRITING, CLOSING, CLOSED = (
    S.IDLE, S.READING, S.HANDLING, S.PARKED, S.WRITING, S.CLOSING, S.CLOSED)
# States in which shutdown waits for the connection.
BUSY_BITS = HANDLING.bit | PARKED.bit | WRITING.bit


class IllegalTransition(RuntimeError):
    pass


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the HTTPError is in `_reject`."""


_UNIQUE = frozenset({"host", "content-length"})
# The start of a chunk-size line: hex digits, then an extension, the line's end or (cut) nothing.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)(?:;|\r|\Z)")
_NAMES: dict[bytes, str] = {}  # raw header name -> lower-case str (bounded cache)
_METHODS: dict[bytes, str] = {}


def _parser_error(exc: Exception) -> HTTPError:
    if isinstance(exc, HttpParserUpgrade):
        return HTTPError(400, "bad_request", "protocol upgrades are not supported", close=True)
    text = str(exc)
    if "Transfer-Encoding" in text and "Content-Length" not in text:
        return HTTPError(501, "unsupported_transfer_coding",
                         "only Transfer-Encoding: chunked is supported", close=True)
    return HTTPError(400, "bad_request", f"malformed request: {text}", close=True)


class Connection:
    __slots__ = (
        "_sock", "fd", "_addr", "_server", "_loop", "_parser", "state", "_mask",
        "_max_header", "_max_body", "_header_timeout", "_keepalive_timeout",
        # the message being parsed
        "_url", "_headers", "_not_utf8", "_hbytes", "_mraw", "_body", "_blen", "_chunked", "_ndone",
        "_chunk_open", "_chunk_new", "_chunk_got", "_ctail", "_ctail_len",
        "_in_headers", "_msg_active", "_want_continue", "_reject", "_method", "_version",
        "_held",
        "_keep_alive", "_target", "_path", "_query",
        # requests and responses
        "_pending", "_sizes", "_queued", "_error", "_paused", "_current", "_parked",
        "_eof", "_linger", "_discarded", "_out",
        # timer heap entry
        "deadline", "_heap_when",
        # the peer address the server counts this connection against (None: not counted)
        "peer_host",
    )

    def __init__(self, server: HTTPServer, sock: socket.socket, addr: Any) -> None:
        self._sock = sock
        self.fd = sock.fileno()
        self._addr = addr
        self._server = server
        self._loop = server._loop
        self._parser = HttpRequestParser(self)
        self.state = IDLE
        self._mask = EV_READ
        st = server.settings
        self._max_header = st.max_header_bytes
        self._max_body = st.max_body_bytes
        self._header_timeout = st.header_timeout
        self._keepalive_timeout = st.keepalive_timeout
        self._url = b""
        self._headers: dict[str, str] = {}
        self._not_utf8 = False  # some header value is not UTF-8 (see messages.Headers)
        self._hbytes = self._mraw = self._blen = 0
        self._chunked = False
        # a chunked body's framing, see `_check_chunk_size`
        self._chunk_open = self._chunk_new = False
        self._chunk_got = self._ctail_len = 0
        self._ctail = b""
        self._ndone = 0  # messages completed, ever
        self._body: list[bytes] | None = None
        self._in_headers = self._msg_active = self._want_continue = False
        self._reject: HTTPError | None = None
        # a request that offered an Upgrade, whose body is still to come (see `_parse`)
        self._held: Request | None = None
        self._method = self._version = self._target = self._path = self._query = ""
        self._keep_alive = True
        self._pending: deque[Request] = deque()
        self._sizes: deque[int] = deque()  # the bytes each of `_pending` holds
        self._queued = 0  # their sum
        self._error: HTTPError | None = None
        self._paused = self._eof = self._linger = False
        self._current: Request | None = None
        self._parked: Deferred | None = None
        self._discarded = 0
        self._out: bytearray | None = None
        self.deadline: float | None = None
        self._heap_when: float | None = None
        self.peer_host: str | None = None

    def __repr__(self) -> str:
        return f"<Connection fd={self.fd} {self.state.name} {self._addr!r}>"

    # -- state machine ---------------------------------------------------------------------
    def _set(self, new: ConnState) -> None:
        if not self.state.allowed & new.bit:
            raise IllegalTransition(f"{self.state.name} -> {new.name}")
        self.state = new

    # -- parser callbacks (inside feed_data; they never touch the socket) --------------------
    def on_message_begin(self) -> None:
        self._msg_active = self._in_headers = True
        self._url = b""
        self._headers = {}
        self._not_utf8 = False
        self._hbytes = self._blen = 0
        self._mraw = -1
        self._chunked = self._chunk_open = self._chunk_new = False
        self._ctail = b""
        self._ctail_len = 0
        self._body = None

    def on_url(self, piece: bytes) -> None:
        self._url += piece
        self._hbytes += len(piece)
        if self._hbytes > self._max_header:
            self._fail_parse(431, "header_too_large", "request header block too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_headers:
            return  # a trailer after a chunked body: ignored
        self._hbytes += len(name) + len(value) + 4
        if self._hbytes > self._max_header:
            self._fail_parse(431, "header_too_large", "request header block too large")
        key = _NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if not key:
                self._fail_parse(400, "bad_request", "empty header name")
            if len(_NAMES) < 2048:
                _NAMES[name] = key
        value = value.strip()
        try:  # text in UTF-8, as the bodies are (ASCII, the usual case, decodes fastest)
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = value.decode("utf-8", "surrogateescape")
            self._not_utf8 = True
        headers = self._headers
        old = headers.get(key)
        if old is None:
            headers[key] = text
        elif key in _UNIQUE:
            self._fail_parse(400, "bad_request", f"more than one {key} header")
        else:
            headers[key] = old + ", " + text

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._hbytes > self._max_header:
            self._fail_parse(431, "header_too_large", "request header block too large")
        parser = self._parser
        version = parser.get_http_version()
        headers = self._headers
        if version == "1.1":
            if "host" not in headers:
                self._fail_parse(400, "bad_request", "HTTP/1.1 request without Host")
        elif version != "1.0":
            self._fail_parse(505, "http_version_not_supported",
                             f"HTTP/{version} is not supported")
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if te is not None:
            if cl is not None:
                self._fail_parse(400, "bad_request",
                                 "Content-Length together with Transfer-Encoding")
            if version == "1.0":
                self._fail_parse(400, "bad_request", "chunked body in an HTTP/1.0 request")
            if te.lower() != "chunked":
                self._fail_parse(501, "unsupported_transfer_coding",
                                 "only Transfer-Encoding: chunked is supported")
            if parser.should_upgrade():  # see `_parse`: only a Content-Length body is read
                self._fail_parse(400, "bad_request",
                                 "a chunked body with an Upgrade offer is not supported; send "
                                 "it without the Upgrade header")
            has_body = True
            self._chunked = True
        elif cl is not None:
            if not (cl.isascii() and cl.isdigit()):
                self._fail_parse(400, "bad_request", "invalid Content-Length")
            length = int(cl)
            if length > self._max_body:
                self._fail_parse(413, "body_too_large",
                                 f"request body larger than {self._max_body} bytes")
            has_body = length > 0
        else:
            has_body = False
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = raw_method.decode("ascii")
            if len(_METHODS) < 64:
                _METHODS[raw_method] = method
        url = self._url
        try:
            parsed = parse_url(url)
        except HttpParserError:
            self._fail_parse(400, "bad_request", "invalid request target")
        raw_path = parsed.path
        if not raw_path or raw_path[0] != 0x2F:  # "/"
            self._fail_parse(400, "bad_request", "the request target must start with /")
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        query = parsed.query
        self._query = query.decode("latin-1") if query else ""
        self._path = path
        self._target = url.decode("latin-1")
        self._method = method
        self._version = version
        self._keep_alive = parser.should_keep_alive()
        if has_body and version == "1.1":
            expect = headers.get("expect")
            if expect is not None and expect.lower() == "100-continue":
                self._want_continue = True

    def on_chunk_header(self) -> None:
        self._chunk_open = self._chunk_new = True
        self._chunk_got = 0

    def on_chunk_complete(self) -> None:
        self._chunk_open = False

    def on_body(self, data: bytes) -> None:
        self._want_continue = False
        self._chunk_got += len(data)
        blen = self._blen + len(data)
        if blen > self._max_body:
            self._fail_parse(413, "body_too_large",
                             f"request body larger than {self._max_body} bytes")
        self._blen = blen
        if self._body is None:
            self._body = [data]
        else:
            self._body.append(data)

    def on_message_complete(self) -> None:
        parts = self._body
        body = b"" if parts is None else parts[0] if len(parts) == 1 else b"".join(parts)
        self._body = None
        self._msg_active = self._want_continue = False
        self._ndone += 1
        held = self._held
        if held is not None:  # the body of a request that offered an Upgrade (`_parse`)
            self._held = None
            held.body = body
            request = held
        else:
            headers = self._headers
            if self._not_utf8:
                headers = Headers(headers)
            request = Request(self._method, self._target, self._path, self._query, headers,
                              body, self._version, self._addr, self._keep_alive)
        self._pending.append(request)
        size = len(body) + self._hbytes
        self._sizes.append(size)
        self._count_queued(size)

    def _count_queued(self, delta: int) -> None:
        """Parsed-ahead bytes came (+) or went (-): this connection's and the server's sums."""
        self._queued += delta
        self._server._queued_bytes += delta

    def _drop_pending(self) -> None:
        """Forget the parsed-ahead requests (they will not be answered)."""
        self._pending.clear()
        self._sizes.clear()
        self._count_queued(-self._queued)

    def _fail_parse(self, status: int, code: str, message: str) -> None:
        self._reject = HTTPError(status, code, message, close=True)
        raise _Reject(message)

    # -- socket events -----------------------------------------------------------------------
    def on_event(self, ev: int) -> None:
        if ev & EV_WRITE and self._out is not None:
            self._on_writable()
        if ev & (EV_READ | EV_ERR | EV_HUP) and self.state is not CLOSED:
            if self._mask & EV_READ:
                self._on_readable()
            elif ev & (EV_ERR | EV_HUP):
                self._close()

    def _on_readable(self) -> None:
        server = self._server
        try:
            n = self._sock.recv_into(server._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        if not n:
            self._on_eof()
            return
        if self.state is CLOSING:
            self._discarded += n
            if self._discarded > LINGER_MAX_BYTES:
                self._close()
            return
        if self._error is not None:
            return  # input after a bad request is dropped
        self._feed(server._rview[:n], n)

    def _feed(self, data: memoryview, n: int) -> None:
        done_before = self._ndone
        self._chunk_new = False
        try:
            self._parse(data)
        except HttpParserError as exc:  # includes callback errors
            err = self._reject or _parser_error(exc)
            self._reject = None
            self._fail(err)
        else:
            if self._msg_active:
                # Bound the raw bytes of the message being read: its header block (including
                # partial lines the parser holds, e.g. a request line that never ends), and
                # for a chunked body its framing and trailers too.
                if self._mraw < 0:  # it began in this chunk: at its start, unless another
                    # message ended earlier in the chunk (then count what the callbacks saw)
                    self._mraw = n if self._ndone == done_before else self._hbytes + self._blen
                else:
                    self._mraw += n
                if self._in_headers:
                    if self._mraw > self._max_header:
                        self._fail(HTTPError(431, "header_too_large",
                                             "request header block too large", close=True))
                elif self._chunked:
                    if self._mraw > self._max_header + 2 * self._max_body:
                        self._fail(HTTPError(413, "body_too_large",
                                             "chunked request body too large", close=True))
                    else:
                        self._check_chunk_size(self._server._rbuf, n)
            if not self._paused and (len(self._pending) >= PIPELINE_MAX
                                     or self._queued > PIPELINE_MAX_BYTES):
                self._paused = True
                self._update_mask()
        st = self.state
        if st is IDLE or st is READING:
            self._pump()

    def _parse(self, data: memoryview) -> None:
        """Feed the parser. A request offering a protocol upgrade (`Upgrade: h2c`, from
        `curl --http2`, or `websocket`) is served as HTTP/1.1, as a server may (RFC 9110, 7.8),
        and the connection goes on in HTTP/1.1. llhttp ends such a request at its header block
        and stops (HttpParserUpgrade): a fresh parser takes the rest, and a Content-Length
        body is read by it as the body of a stand-in head (`on_message_complete` gives it
        to the held request). A chunked body with an Upgrade offer was refused earlier."""
        while True:
            try:
                self._parser.feed_data(data)
                return
            except HttpParserUpgrade as exc:
                offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
                if not self._pending:
                    raise
                self._parser = HttpRequestParser(self)
                request = self._pending[-1]
                # plain dict reads: these two are ASCII if they are anything we act on
                length = int(dict.get(request.headers, "content-length") or 0)
                if length:
                    self._pending.pop()
                    self._count_queued(-self._sizes.pop())
                    self._held = request
                    expect = dict.get(request.headers, "expect")
                    self._parser.feed_data(
                        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n%s\r\n"
                        % (length, b"Expect: 100-continue\r\n" if expect is not None
                           and expect.lower() == "100-continue" else b""))
                data = data[offset:]

    def _check_chunk_size(self, buf: bytearray, n: int) -> None:
        """Refuse a chunked body as soon as its declared sizes pass the limit (413), not once
        that much data has come (or the client, sending no more, met the header timeout).

        httptools does not hand the chunk size over, so it is read here from the raw bytes
        `buf[:n]` just parsed. Only the chunk still open at their end needs it (a completed
        chunk's data went through `on_body`, which counts it), and its size line ends where
        that chunk's data in this read begins: `_chunk_got` bytes before the end. What began
        in earlier reads is in `_ctail` (the first bytes after the last line feed seen so far,
        `_ctail_len` of them in all). A line that does not start with a size is a trailer of
        the last chunk (size 0). A size line longer than CHUNK_LINE_MAX is refused (400)."""
        if self._chunk_new and self._chunk_open:
            end = n - self._chunk_got - 1  # the size line's line feed
            if end >= 0 and buf[end] == 0x0A:  # else: inside the last chunk's trailers
                lf = buf.rfind(b"\n", 0, end)
                if lf >= 0:
                    head = bytes(buf[lf + 1:min(end, lf + 1 + CHUNK_LINE_MAX)])
                    length = end - lf - 1
                else:
                    head = self._ctail + bytes(buf[:min(end, CHUNK_LINE_MAX)])
                    length = self._ctail_len + end
                found = _CHUNK_SIZE.match(head)
                if found is not None:
                    if length > CHUNK_LINE_MAX + 1:  # + 1: the carriage return
                        self._fail(HTTPError(400, "bad_request", "chunk-size line too long",
                                             close=True))
                        return
                    declared = self._blen - self._chunk_got + int(found[1], 16)
                    if declared > self._max_body:
                        self._fail(HTTPError(
                            413, "body_too_large",
                            f"request body larger than {self._max_body} bytes", close=True))
                        return
        lf = buf.rfind(b"\n", 0, n)
        if lf >= 0:
            self._ctail = bytes(buf[lf + 1:min(n, lf + 1 + CHUNK_LINE_MAX)])
            self._ctail_len = n - lf - 1
        else:
            if len(self._ctail) < CHUNK_LINE_MAX:
                self._ctail += bytes(buf[:min(n, CHUNK_LINE_MAX - len(self._ctail))])
            self._ctail_len += n

    def _fail(self, err: HTTPError) -> None:
        """The input broke the rules: answer `err` after the queued requests, then close."""
        self._error = err
        self._msg_active = self._in_headers = self._want_continue = False
        self._linger = True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rejecting request from %s: %s %s", self._addr, err.status, err.message)

    def _on_eof(self) -> None:
        """The client sent FIN (see the module docstring): answer what it sent, then close."""
        st = self.state
        if st is IDLE or st is READING or (st is CLOSING and self._out is None):
            # Nothing to answer (a partial request never will be), or our last answer is out
            # and we were only waiting for this FIN.
            self._close()
            return
        self._eof = True
        self._update_mask()  # stop reading: the socket now stays readable (EOF) for good
        if st is HANDLING or st is PARKED:
            self._probe()
        # WRITING and CLOSING: the answer going out does the probe's work.

    def _probe(self) -> None:
        """A request is in progress and the client sent FIN: find out whether it can still
        read. An HTTP/1.1 client gets an interim `100 Continue`, which it must accept and may
        ignore (RFC 9110, 15.2); a socket closed for good answers it with a reset, which ends
        the connection and cancels its parked request (`on_event`). A client that reads the
        probe and closes later is noticed when its answer goes out, or at its request's
        timeout: no later than a client that keeps its connection open and never reads.

        HTTP/1.0 allows no interim response, so there is no probe: a waiting long-poll is
        answered at once with its timeout answer (valid, if empty; the client polls again) and
        leaves the waiters, rather than hold a slot for a client that may be gone; a `working`
        request is answered when its work is done (`_park`)."""
        req = self._current
        if req is None or req.http_version != "1.1":
            deferred = self._parked
            if deferred is not None and not deferred.working:
                self._deferred_timeout(deferred)
            return
        self._write(CONTINUE)
        if self.state is CLOSED:
            return
        if not self._loop.reports_idle_errors:
            # The selectors fallback drops a descriptor with an empty mask: look for the reset.
            self._loop.call_later(PROBE_CHECK, self._check_reset, PROBE_CHECK)

    def _check_reset(self, delay: float) -> None:
        if self.state is CLOSED:
            return
        try:
            failed = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            failed = True
        if failed:
            self._close()
            return
        delay = min(2 * delay, 1.0)
        self._loop.call_later(delay, self._check_reset, delay)

    def _on_writable(self) -> None:
        out = self._out
        try:
            n = self._sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        del out[:n]
        if out:
            self._set_deadline(monotonic() + self._keepalive_timeout)
            return
        self._out = None
        self._update_mask()
        st = self.state
        if st is WRITING:
            self._pump()
        elif st is CLOSING:
            self._finish_close()

    def _update_mask(self) -> None:
        mask = 0
        if not self._eof and not self._paused:
            mask = EV_READ
        if self._out is not None:
            mask |= EV_WRITE
        if mask != self._mask and self.state is not CLOSED:
            self._mask = mask
            self._loop.modify(self.fd, mask)

    # -- request flow ------------------------------------------------------------------------
    def _pump(self) -> None:
        """Nothing is in flight: handle queued requests in order, then wait for more."""
        server = self._server
        pending = self._pending
        while True:
            if server._closing:
                self._set(CLOSING)
                self._finish_close()
                return
            if pending:
                req = pending.popleft()
                self._count_queued(-self._sizes.popleft())
                if self._paused and len(pending) <= PIPELINE_RESUME and (
                        self._queued <= PIPELINE_MAX_BYTES // 2):
                    self._paused = False
                    self._update_mask()
                self._set(HANDLING)
                self._current = req
                result = self._dispatch(req)
                if result is None or not self._respond(result):
                    return
                continue
            if self._error is not None:
                err, self._error = self._error, None
                self._send_final(err.to_response())
                return
            if self._eof:
                self._close()
                return
            if self._msg_active:
                if self.state is not READING:
                    self._set(READING)
                    self._set_deadline(monotonic() + self._header_timeout)
                if self._want_continue:
                    self._want_continue = False
                    self._write(CONTINUE)
            else:
                self._set(IDLE)
                self._set_deadline(monotonic() + self._keepalive_timeout)
            return

    def _dispatch(self, req: Request) -> Response | None:
        """Run the handler inline or hand it to a worker. A Response to send now, or None."""
        server = self._server
        try:
            handler = server._app.resolve(req)
            if getattr(handler, "blocking", False):
                server._in_flight += 1
                server._pool.submit(self._run_blocking, req, handler)
                return None
            result = handler(req)
        except HTTPError as exc:
            return exc.to_response()
        except Exception:
            log.exception("unhandled error in handler for %s %s", req.method, req.target)
            return internal_error()
        if result.__class__ is Response:
            return result
        return self._take_result(result)

    def _run_blocking(self, req: Request, handler: Any) -> None:
        """On a worker thread: run the handler, hand the result to the loop."""
        try:
            result = handler(req)
        except HTTPError as exc:
            result = exc.to_response()
        except Exception:
            log.exception("unhandled error in handler for %s %s", req.method, req.target)
            result = internal_error()
        self._loop.call_soon_threadsafe(self._worker_done, req, result)

    def _worker_done(self, req: Request, result: Any) -> None:
        self._server._in_flight -= 1
        if self._current is not req or self.state is not HANDLING:
            # The connection went away meanwhile.
            if isinstance(result, Deferred):
                _cancel_quietly(result)
            return
        response = self._take_result(result)
        if response is not None and self._respond(response):
            self._pump()

    def _take_result(self, result: Any) -> Response | None:
        if isinstance(result, Response):
            return result
        if isinstance(result, Deferred):
            return self._park(result)
        log.error("handler returned %r, not a Response or Deferred", type(result).__name__)
        return internal_error()

    def _respond(self, resp: Response, shared: bool = False) -> bool:
        """Send the answer to `_current`. True if it went out whole and the connection goes on
        (the caller then pumps); False if it is pending, or the connection is closing.
        `shared`: `resp` may go to many connections (a Deferred's answer), so its bytes are
        rendered once and remembered on it (`wire.render_shared`)."""
        req = self._current
        self._current = None
        server = self._server
        close = resp.close or not req.keep_alive or server._closing or (
            # the client sent FIN: this is the last answer unless more requests came before it
            self._eof and not self._pending and self._error is None)
        if close:
            conn_line = CONN_CLOSE
        elif req.http_version == "1.0":
            conn_line = CONN_KEEP_ALIVE
        else:
            conn_line = b""
        head_only = req.method == "HEAD"
        try:
            if shared and not head_only:
                data = render_shared(resp, conn_line, server._date)
            else:
                data = render(resp, head_only, conn_line, server._date)
        except Exception:
            log.exception("cannot render the response to %s %s", req.method, req.target)
            data = render(internal_error(), head_only, conn_line, server._date)
        server._served += 1
        if close:
            self._set(CLOSING)
            if self._write(data):
                self._finish_close()
            return False
        if self._write(data):
            return True
        if self.state is not CLOSED:
            self._set(WRITING)
            self._set_deadline(monotonic() + self._keepalive_timeout)
        return False

    def _send_final(self, resp: Response) -> None:
        """An error of our own (bad request, timeout): send it with Connection: close."""
        self._set(CLOSING)
        self._linger = True
        self._server._served += 1
        if self._write(render(resp, False, CONN_CLOSE, self._server._date)):
            self._finish_close()
        elif self.state is not CLOSED:
            self._set_deadline(monotonic() + LINGER_SECONDS)

    def _write(self, data: bytes) -> bool:
        """Send now; buffer what the socket did not take. True if all of it went out."""
        out = self._out
        if out is not None:
            out += data
            return False
        try:
            n = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close()
            return False
        if n == len(data):
            return True
        self._out = bytearray(memoryview(data)[n:])
        self._update_mask()
        return False

    def _finish_close(self) -> None:
        """The last response is out. Close now, or half-close and drain the client's input
        first when it may still be sending (so our answer is not lost to a TCP reset)."""
        if self.state is CLOSED or self._out is not None:
            return
        if self._eof or not (self._linger or self._msg_active or self._pending):
            self._close()
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close()
            return
        self._drop_pending()
        self._msg_active = False
        self._paused = False
        self._update_mask()
        self._set_deadline(monotonic() + LINGER_SECONDS)

    # -- parking (long-polls) ----------------------------------------------------------------
    def _park(self, deferred: Deferred) -> Response | None:
        self._set(PARKED)
        self._parked = deferred
        self._server._parked += 1
        early = deferred._attach(self._loop, partial(self._deferred_answer, deferred))
        if early is not None:
            self._unpark()
            self._set(HANDLING)
            return early
        # The connection's own moving deadline times the wait (see `_timer_fire`), not a timer
        # of its own: parking and answering thousands of long-polls then allocates no timer
        # and leaves no cancelled entries in the loop's heap.
        self._set_deadline(monotonic() + deferred.timeout)
        if self._eof and not deferred.working and self._current.http_version != "1.1":
            return self._expire(deferred)  # FIN from an HTTP/1.0 client: see `_probe`
        return None

    def _unpark(self) -> None:
        self._parked = None
        self._server._parked -= 1

    def _deferred_answer(self, deferred: Deferred, response: Response) -> None:
        """The Deferred's sender: always called on the loop thread."""
        if self._parked is not deferred:
            return  # the connection was closed or shut down meanwhile
        self._unpark()
        self._set(HANDLING)
        if not isinstance(response, Response):
            log.error("a Deferred was resolved with %r", type(response).__name__)
            response = internal_error()
        if self._respond(response, shared=True):
            self._pump()

    def _deferred_timeout(self, deferred: Deferred) -> None:
        if self._parked is not deferred:
            return
        response = self._expire(deferred)
        if response is not None and self._respond(response):
            self._pump()

    def _expire(self, deferred: Deferred) -> Response | None:
        """Time the parked `deferred` out now and unpark: its timeout answer, to send; or None
        if it was resolved from another thread just now (its sender is on the way)."""
        try:
            timed_out, response = deferred._time_out()
        except Exception:
            log.exception("error in a Deferred's on_timeout")
            timed_out, response = True, internal_error()
        if not timed_out:
            return None
        if response is None:
            log.error("a Deferred's on_timeout returned None")
            response = internal_error()
        elif not isinstance(response, Response):
            log.error("a Deferred's on_timeout returned %r", type(response).__name__)
            response = internal_error()
        self._unpark()
        self._set(HANDLING)
        return response

    # -- timers ------------------------------------------------------------------------------
    def _set_deadline(self, when: float) -> None:
        self.deadline = when
        at = self._heap_when
        if at is None or when < at:
            if at is not None:
                self._loop.entry_died()  # the later entry is superseded
            self._heap_when = when
            self._loop.add_deadline(when, self)

    def _timer_fire(self, when: float) -> bool:
        """Our heap entry came due. Returns True if it was a dead entry."""
        st = self.state
        if when != self._heap_when or st is CLOSED:
            return True  # superseded by an earlier entry, or the connection is gone
        self._heap_when = None
        deadline = self.deadline
        if deadline is None:
            return False
        if deadline > monotonic():
            self._heap_when = deadline
            self._loop.add_deadline(deadline, self)
            return False
        self.deadline = None
        if st is IDLE or st is WRITING or st is CLOSING:
            self._close()  # idle keep-alive, stalled reader, or lingering: silently
        elif st is READING:
            self._drop_pending()
            self._error = None
            self._msg_active = False
            self._send_final(HTTPError(408, "request_timeout",
                                       "request not received in time").to_response())
        elif st is PARKED:
            self._deferred_timeout(self._parked)  # the Deferred's own timeout
        # HANDLING: exempt (the handler is running)
        return False

    def _timer_dead(self, when: float) -> bool:
        return when != self._heap_when or self.state is CLOSED

    # -- shutdown and close ------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self.state.bit & BUSY_BITS) or (
            self.state is CLOSING and self._out is not None)

    def begin_shutdown(self) -> None:
        st = self.state
        if st is IDLE or st is READING:
            self._close()
        elif st is PARKED:
            deferred = self._parked
            if deferred.done or deferred.working:
                # Resolved from another thread (its answer is on the way), or work in
                # progress: both are left to finish within the grace period.
                return
            self._unpark()
            _cancel_quietly(deferred)
            self._set(HANDLING)
            self._respond(HTTPError(503, "shutting_down", "the server is shutting down",
                                    close=True).to_response())
        # HANDLING and WRITING finish their response, then close (server._closing).

    def _close(self) -> None:
        if self.state is CLOSED:
            return
        deferred = self._parked
        if deferred is not None:
            self._unpark()
            _cancel_quietly(deferred)
        self._set(CLOSED)
        if self._heap_when is not None:
            self._loop.entry_died()
        self._server._forget(self)
        self._loop.unregister(self.fd)
        with contextlib.suppress(OSError):
            self._sock.close()
        self._drop_pending()
        self._out = None
        self._current = None
        self._parser = None  # break the parser <-> connection cycle
        self.deadline = None


def _cancel_quietly(deferred: Deferred) -> None:
    try:
        deferred._cancel()
    except Exception:
        log.exception("error in a Deferred's on_cancel")
