"""A Python client for hachat that finds and follows the active node.

Standard library only (``http.client`` + ``json``)::

    from hachat.client import HachatClient

    c = HachatClient(["http://127.0.0.1:8080", "http://127.0.0.1:8081"])
    c.login("alice", "correct horse")
    group = c.create_group("friends")
    c.post_message(group["id"], "hello")
    for event in c.follow():          # forever; resumes from its cursor across failovers
        print(event["type"], event["data"])

How it follows the active node
------------------------------
Every call is sent to :attr:`HachatClient.active_url`. When the answer is
``503 not_active`` the client switches to the ``active`` URL named in the answer (or, when the
answer names none, to the next node); when the connection is refused, reset or times out it
tries the next node; ``503 database_unavailable`` and gateway errors (502/503/504 from a proxy)
are retried. Retries wait with exponential backoff and jitter (capped at about one second) and
give up after ``max_retry_time`` seconds with :class:`ClientError` (``status`` is the last HTTP
status seen, or ``None`` when no node answered).

Any other error answer (4xx, 500) raises :class:`ClientError` at once, without a retry.

Retries and duplicates: :meth:`HachatClient.post_message` always sends a ``clientMessageId``
(a fresh uuid4 unless given) and reuses it across its own retries, so a retry after a lost answer
returns the message already stored instead of posting it twice. Other writes (for instance
:meth:`create_group`) have no such key: if the answer to one is lost in a failover, the retry may
perform it a second time.

Thread-safety
-------------
A client is **not** thread-safe: it keeps one persistent keep-alive connection per node and the
current cursor. Use one client per thread; :meth:`HachatClient.clone` makes a copy that shares the
login (token) but not the connections, e.g. one to :meth:`follow` events in a thread while
another posts.
"""

from __future__ import annotations

import collections
import http.client
import json
import random
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

__all__ = ["ClientError", "HachatClient"]

_BACKOFF_BASE = 0.05  # first retry waits ~50 ms ...
_BACKOFF_CAP = 1.0  # ... doubling up to ~1 s
_RETRY_STATUSES = {502, 503, 504}  # answered by a proxy or a node that cannot serve right now
_NETWORK_ERRORS = (OSError, http.client.HTTPException)  # refused, reset, timeout, bad answer
# what a keep-alive connection the server closed while idle looks like on the next request
_STALE_ERRORS = (
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    http.client.BadStatusLine,
)
_SEEN_EVENT_IDS = 10_000  # how many recent event ids follow() remembers for de-duplication


class ClientError(Exception):
    """An error answer from hachat, or no usable answer within ``max_retry_time``.

    ``status`` is the HTTP status (``None`` when no node could be reached), ``code`` the API's
    ``error`` code (``"unreachable"`` when no node answered), ``message`` human text and ``body``
    the decoded answer (a dict; ``{}`` when there was none).
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status if status is not None else '-'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body if body is not None else {}


def _normalize_url(url: str) -> str:
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class _Answer:
    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: dict[str, Any], headers: http.client.HTTPMessage):
        self.status = status
        self.body = body
        self.headers = headers


class HachatClient:
    """A hachat client that follows the active node of a pair (see the module docstring).

    ``urls``: the nodes (a list, or one string; a string may hold several URLs separated by
    commas), e.g. both nodes, or just the HAProxy address. ``timeout``: socket timeout of a
    single request (a long-poll waits its own ``timeout`` on top of it). ``max_retry_time``: how
    long one call keeps retrying before it raises :class:`ClientError`. ``token``: reuse an
    existing login.
    """

    def __init__(
        self,
        urls: list[str] | tuple[str, ...] | str,
        *,
        timeout: float = 10.0,
        max_retry_time: float = 15.0,
        token: str | None = None,
    ) -> None:
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        normalized: list[str] = []
        for url in urls:
            n = _normalize_url(url)
            if n not in normalized:
                normalized.append(n)
        if not normalized:
            raise ValueError("at least one node URL is needed")
        self.urls: list[str] = normalized
        self.timeout = float(timeout)
        self.max_retry_time = float(max_retry_time)
        self.token: str | None = token
        self.user_id: int | None = None
        self.username: str | None = None
        #: the last event cursor seen by :meth:`events` / :meth:`follow` (``None`` before any)
        self.cursor: int | None = None
        self._index = 0
        self._conns: dict[str, http.client.HTTPConnection] = {}

    # ------------------------------------------------------------------ plumbing

    @property
    def active_url(self) -> str:
        """The node the next call goes to first (the last one that answered as active)."""
        return self.urls[self._index]

    def clone(self) -> HachatClient:
        """A new client with the same nodes, settings and login, but its own connections
        (for use in another thread)."""
        other = HachatClient(
            list(self.urls),
            timeout=self.timeout,
            max_retry_time=self.max_retry_time,
            token=self.token,
        )
        other.user_id = self.user_id
        other.username = self.username
        other._index = self._index
        return other

    def close(self) -> None:
        """Close every open connection (they reopen on the next call)."""
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def __enter__(self) -> HachatClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connection(self, url: str) -> http.client.HTTPConnection:
        conn = self._conns.get(url)
        if conn is None:
            parts = urlsplit(url)
            cls = (
                http.client.HTTPSConnection
                if parts.scheme == "https"
                else http.client.HTTPConnection
            )
            conn = cls(parts.hostname, parts.port, timeout=self.timeout)
            self._conns[url] = conn
        return conn

    def _drop_connection(self, url: str) -> None:
        conn = self._conns.pop(url, None)
        if conn is not None:
            conn.close()

    def _switch_to(self, url: str | None) -> None:
        """Make ``url`` (added when unknown) or else the next node the active one."""
        if url:
            try:
                url = _normalize_url(url)
            except ValueError:
                url = None
        if url and url != self.active_url:
            if url not in self.urls:
                self.urls.append(url)
            self._index = self.urls.index(url)
        else:
            self._index = (self._index + 1) % len(self.urls)

    def _send_once(
        self,
        url: str,
        method: str,
        target: str,
        payload: bytes | None,
        headers: dict[str, str],
        timeout: float,
    ) -> _Answer:
        """One request on the node's keep-alive connection. A request on a reused connection
        that the server had already closed is retried once at once on a fresh connection."""
        for fresh_try in (False, True):
            conn = self._connection(url)
            reused = conn.sock is not None
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, urlsplit(url).path + target, body=payload, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except _NETWORK_ERRORS as exc:
                self._drop_connection(url)
                if reused and not fresh_try and isinstance(exc, _STALE_ERRORS):
                    continue
                raise
            if resp.will_close:
                self._drop_connection(url)
            return _Answer(resp.status, self._decode(raw), resp.headers)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _decode(raw: bytes) -> dict[str, Any]:
        if not raw:
            return {}
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {"raw": raw.decode("utf-8", "replace")}
        return value if isinstance(value, dict) else {"value": value}

    def _backoff(self, attempt: int) -> float:
        ceiling = min(_BACKOFF_CAP, _BACKOFF_BASE * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)  # jitter: half to full

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        auth: bool = True,
        timeout: float | None = None,
        max_retry_time: float | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send a request to the active node, following failovers; return the decoded body."""
        target = path
        if query:
            clean = {k: v for k, v in query.items() if v is not None}
            if clean:
                target += "?" + urlencode(clean)
        payload = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Accept": "application/json", "User-Agent": "hachat-client"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if extra_headers:
            headers.update(extra_headers)
        socket_timeout = self.timeout if timeout is None else timeout
        budget = self.max_retry_time if max_retry_time is None else max_retry_time
        deadline = time.monotonic() + budget

        attempt = 0
        last_status: int | None = None
        last_code = "unreachable"
        last_message = "no node could be reached"
        last_body: dict[str, Any] = {}
        while True:
            url = self.active_url
            follow_hint = False
            try:
                answer = self._send_once(url, method, target, payload, headers, socket_timeout)
            except _NETWORK_ERRORS as exc:
                last_status, last_code, last_body = None, "unreachable", {}
                last_message = f"{url}: {type(exc).__name__}: {exc}"
                self._switch_to(None)
            else:
                if answer.status < 400:
                    return answer.body
                code = str(answer.body.get("error") or f"http_{answer.status}")
                message = str(answer.body.get("message") or answer.body.get("raw") or code).strip()
                if answer.status not in _RETRY_STATUSES:
                    raise ClientError(answer.status, code, message, answer.body)
                last_status, last_code, last_message, last_body = (
                    answer.status,
                    code,
                    message,
                    answer.body,
                )
                if code == "not_active":
                    hint = answer.body.get("active")
                    hint = hint if isinstance(hint, str) and hint else None
                    before = self.active_url
                    self._switch_to(hint)
                    # go straight to a named active node the first time; back off after that
                    follow_hint = hint is not None and self.active_url != before and attempt == 0
                # database_unavailable / proxy errors: retry the same address after a pause
            delay = 0.0 if follow_hint else self._backoff(attempt)
            attempt += 1
            if time.monotonic() + delay > deadline:
                raise ClientError(
                    last_status,
                    last_code,
                    f"gave up after {budget:g}s and {attempt} attempt(s): {last_message}",
                    last_body,
                )
            if delay:
                time.sleep(delay)

    # ------------------------------------------------------------------ node

    def health(self, url: str | None = None) -> dict[str, Any]:
        """``GET /health`` of one node (default: :attr:`active_url`), without failover."""
        target = _normalize_url(url) if url else self.active_url
        try:
            answer = self._send_once(
                target, "GET", "/health", None, {"Accept": "application/json"}, self.timeout
            )
        except _NETWORK_ERRORS as exc:
            raise ClientError(None, "unreachable", f"{target}: {exc}") from exc
        if answer.status >= 400 and not answer.body.get("status"):
            raise ClientError(
                answer.status,
                str(answer.body.get("error") or f"http_{answer.status}"),
                str(answer.body.get("message") or ""),
                answer.body,
            )
        return answer.body

    def find_active(self, max_wait: float | None = None) -> str:
        """Poll ``/health`` of every node until one says it is active; make it
        :attr:`active_url` and return it. Raises :class:`ClientError` after ``max_wait``
        (default ``max_retry_time``) seconds."""
        deadline = time.monotonic() + (self.max_retry_time if max_wait is None else max_wait)
        attempt = 0
        while True:
            for i, url in enumerate(list(self.urls)):
                try:
                    if self.health(url).get("active") is True:
                        self._index = i
                        return url
                except ClientError:
                    pass
            delay = self._backoff(attempt)
            attempt += 1
            if time.monotonic() + delay > deadline:
                raise ClientError(None, "no_active_node", "no node reports itself active")
            time.sleep(delay)

    def _admin(self, url: str, path: str, admin_token: str | None) -> dict[str, Any]:
        target = _normalize_url(url)
        headers = {"Accept": "application/json"}
        if admin_token:
            headers["Authorization"] = f"Bearer {admin_token}"
        try:
            answer = self._send_once(target, "POST", path, None, headers, self.timeout)
        except _NETWORK_ERRORS as exc:
            raise ClientError(None, "unreachable", f"{target}: {exc}") from exc
        if answer.status >= 400:
            raise ClientError(
                answer.status,
                str(answer.body.get("error") or f"http_{answer.status}"),
                str(answer.body.get("message") or ""),
                answer.body,
            )
        return answer.body

    def fall(self, url: str, admin_token: str | None = None) -> dict[str, Any]:
        """``POST /fall`` on one node (simulate a failure), without failover."""
        return self._admin(url, "/fall", admin_token)

    def revive(self, url: str, admin_token: str | None = None) -> dict[str, Any]:
        """``POST /revive`` on one node (it comes back passive), without failover."""
        return self._admin(url, "/revive", admin_token)

    # ------------------------------------------------------------------ accounts

    def login(self, username: str, password: str) -> dict[str, Any]:
        """Sign in, or create the account when the name is free. Stores the token and user id;
        returns ``{"userId", "username", "token", "created"}``."""
        body = self._request(
            "POST", "/login", body={"username": username, "password": password}, auth=False
        )
        self.token = body.get("token")
        self.user_id = body.get("userId")
        self.username = body.get("username", username)
        return body

    def logout(self) -> dict[str, Any]:
        """End the session on the server and forget the token."""
        try:
            return self._request("POST", "/logout")
        finally:
            self.token = None
            self.user_id = None

    # ------------------------------------------------------------------ groups

    def chats(self) -> dict[str, Any]:
        """``{"chats": [{"id", "name", "createdBy", "createdAt"}]}``: my groups."""
        return self._request("GET", "/chats")

    def create_group(self, name: str, member_ids: Iterable[int] = ()) -> dict[str, Any]:
        """Create a group (I am a member); returns the group with ``memberIds``."""
        return self._request(
            "POST", "/groups", body={"name": name, "memberIds": [int(i) for i in member_ids]}
        )

    def add_member(
        self, group_id: int, user_id: int | None = None, username: str | None = None
    ) -> dict[str, Any]:
        """Add a user by id or by username; ``{"groupId", "userId", "added"}``."""
        if (user_id is None) == (username is None):
            raise ValueError("give exactly one of user_id and username")
        body: dict[str, Any] = (
            {"userId": int(user_id)} if user_id is not None else {"username": username}
        )
        return self._request("POST", f"/groups/{int(group_id)}/members", body=body)

    def remove_member(self, group_id: int, user_id: int) -> dict[str, Any]:
        """Remove a member (myself, or anyone in a group I created)."""
        return self._request(
            "DELETE", f"/groups/{int(group_id)}/members", body={"userId": int(user_id)}
        )

    def group_users(self, group_id: int) -> dict[str, Any]:
        """``{"users": [{"id", "username"}]}``."""
        return self._request("GET", "/group-users", query={"groupId": int(group_id)})

    # ------------------------------------------------------------------ messages

    def messages(
        self, group_id: int, before: int | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """One page of history, newest first: ``{"messages": [...], "nextBefore": id | None}``."""
        return self._request(
            "GET",
            "/messages",
            query={"groupId": int(group_id), "before": before, "limit": limit},
        )

    def all_messages(self, group_id: int, page_size: int = 200) -> list[dict[str, Any]]:
        """Every message of the group, oldest first (follows ``nextBefore`` page by page)."""
        out: list[dict[str, Any]] = []
        before: int | None = None
        while True:
            page = self.messages(group_id, before=before, limit=page_size)
            out.extend(page.get("messages") or [])
            before = page.get("nextBefore")
            if before is None or not page.get("messages"):
                break
        out.reverse()
        return out

    def post_message(
        self, group_id: int, content: str, client_message_id: str | None = None
    ) -> dict[str, Any]:
        """Post a message. Always sends a ``clientMessageId`` (uuid4 unless given), the same one
        on every retry, so a retry after a lost answer cannot store it twice."""
        cmid = client_message_id or str(uuid.uuid4())
        # The key also goes in an Idempotency-Key header when it can travel there unchanged, so
        # that a proxy (deploy/haproxy.cfg) may resend the request after a lost answer.
        header_safe = cmid == cmid.strip() and cmid.isascii() and cmid.isprintable()
        return self._request(
            "POST",
            "/messages",
            body={"groupId": int(group_id), "content": content, "clientMessageId": cmid},
            extra_headers={"Idempotency-Key": cmid} if header_safe else None,
        )

    def delete_message(self, message_id: int) -> dict[str, Any]:
        """Delete one of my messages: ``{"deleted": id}``."""
        return self._request("DELETE", "/messages", body={"messageId": int(message_id)})

    # ------------------------------------------------------------------ real-time

    def notify(self, group_id: int, message: Any) -> dict[str, Any]:
        """Send a ``group.notify`` event (any JSON) to the group's members."""
        return self._request(
            "POST", f"/notify/{quote(str(int(group_id)))}", body={"message": message}
        )

    def events(self, since: int | None = None, timeout: float = 25) -> dict[str, Any]:
        """``GET /events``: without ``since`` the current cursor at once; with it, the events
        after it (waiting up to ``timeout`` s). Returns ``{"events": [...], "cursor": n}`` and
        remembers the cursor in :attr:`cursor`. ``410 cursor_expired`` raises ClientError."""
        query: dict[str, Any] = {"timeout": _fmt_seconds(timeout)}
        if since is not None:
            query = {"since": int(since), **query}
        body = self._request(
            "GET",
            "/events",
            query=query,
            # the server may hold the request for `timeout` s: wait that long plus the usual
            timeout=(float(timeout) if since is not None else 0.0) + self.timeout,
        )
        if body.get("cursor") is not None:
            self.cursor = body["cursor"]
        return body

    def follow(
        self,
        since: int | None = None,
        timeout: float = 25,
        *,
        stop: threading.Event | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield events forever, in order, resuming from the cursor across failovers: nothing
        lost, nothing repeated (events are also de-duplicated by id).

        Without ``since`` it starts from the current cursor (only events from now on). While no
        node can be reached it keeps retrying (it never gives up on its own); an error answer
        other than "unavailable" (e.g. 401, or 410 ``cursor_expired``) is raised. Set ``stop``
        (a ``threading.Event``) to end the generator after the current long-poll.
        """
        seen: collections.OrderedDict[int, None] = collections.OrderedDict()
        cursor = since
        attempt = 0
        while stop is None or not stop.is_set():
            try:
                page = self.events(since=cursor, timeout=timeout if cursor is not None else 0)
            except ClientError as exc:
                if exc.status is not None and exc.status not in _RETRY_STATUSES:
                    raise
                time.sleep(self._backoff(attempt))  # every node down for a while: keep trying
                attempt += 1
                continue
            attempt = 0
            for event in page.get("events") or []:
                event_id = event.get("id")
                if event_id is not None:
                    if event_id in seen:
                        continue
                    seen[event_id] = None
                    if len(seen) > _SEEN_EVENT_IDS:
                        seen.popitem(last=False)
                yield event
            if page.get("cursor") is not None:
                cursor = page["cursor"]


def _fmt_seconds(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"
