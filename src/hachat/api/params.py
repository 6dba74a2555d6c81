"""Request parameters: a JSON object body and/or the query string, checked field by field.

Every failure names the field and writes nothing: handlers read all parameters before they
open a transaction.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import parse_qsl

from hachat.api.errors import invalid_field, invalid_json, secret_in_query
from hachat.http.messages import HTTPError, Request

INT64_MAX = 2**63 - 1
_MISSING = object()

# Numbers written as text (query string, path, a JSON string) are ASCII only: `str.isdigit`,
# `int()` and `float()` also take other scripts' digits ("١"), superscripts ("²"), "1_0",
# surrounding white space, "nan" and "inf".
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,19}")
_UNSIGNED_TEXT = re.compile(r"[0-9]{1,19}")
_DECIMAL_TEXT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?")
_UNSIGNED_DECIMAL_TEXT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?")
_TEXT_MAX = 40  # a longer number is no timeout anyone means
_INT_DIGITS_MAX = 4000  # below Python's own limit on reading integers (4,300 digits)
# Arrays and objects nested deeper than this are refused. A body is echoed back later (a
# /notify message in every member's /events answers, wrapped in a few more levels): without
# a bound, a value Python could just parse (~990 levels) would be stored and then fail to
# encode on every read of the stream.
JSON_DEPTH_MAX = 100


# Names that carry a secret. They are refused in any query string (a URL is written to proxy
# and access logs, browser history, Referer headers): a password belongs in the JSON body, a
# token in the Authorization header. Compared case-insensitively, after percent-decoding.
SECRET_QUERY_NAMES = {"password": "password", "token": "token", "access_token": "token",
                      "admin_token": "token"}
_SECRET_HINTS = ("password", "token", "%")


def reject_secrets_in_query(query_string: str) -> None:
    """400 `secret_in_query` when the query string names a secret (see SECRET_QUERY_NAMES)."""
    if not query_string:
        return
    lowered = query_string.lower()
    if not any(hint in lowered for hint in _SECRET_HINTS):
        return  # the common case: no need to decode
    for key, _ in parse_qsl(query_string, keep_blank_values=True):
        kind = SECRET_QUERY_NAMES.get(key.strip().lower())
        if kind == "password":
            raise secret_in_query(
                "password", "a password must never be sent in the URL: send it in the JSON "
                            "body (the URL is kept in logs); nothing was done")
        if kind == "token":
            raise secret_in_query(
                key, f"'{key}' must never be sent in the URL: send the token in the "
                     "'Authorization: Bearer <token>' header (the URL is kept in logs); "
                     "nothing was done")


def parse_query(query_string: str) -> dict[str, str]:
    """The query string's fields. One named twice is 422: taking the last (or the first)
    would quietly drop what the client meant, e.g. `memberIds=1&memberIds=2` (a list is
    one field, comma-separated)."""
    fields: dict[str, str] = {}
    # Percent-encoded bytes must be UTF-8, as bodies must: never replaced with U+FFFD.
    for key, value in parse_qsl(query_string, keep_blank_values=True, errors="surrogateescape"):
        if not _is_unicode(key):
            raise invalid_field(key.encode("utf-8", "replace").decode(),
                                "a field name in the query string is not UTF-8 text")
        if not _is_unicode(value):
            raise invalid_field(key, f"'{key}' in the query string is not UTF-8 text "
                                     "(percent-encode its UTF-8 bytes)")
        if key in fields:
            raise invalid_field(key, f"'{key}' is given more than once in the query string; "
                                     "give it once (a list of ids: comma-separated)")
        fields[key] = value
    return fields


class Params:
    """Fields of one request: the JSON body's (when it has one) over the query string's."""

    __slots__ = ("_body", "_query")

    def __init__(self, body: dict[str, Any], query: dict[str, str]) -> None:
        self._body = body
        self._query = query

    @classmethod
    def of(cls, request: Request) -> Params:
        query = parse_query(request.query_string) if request.query_string else {}
        return cls(parse_json_object(request.body), query)

    def raw(self, name: str) -> tuple[Any, bool]:
        """The value and whether it came from the query string (so it is text)."""
        if name in self._body:
            return self._body[name], False
        if name in self._query:
            return self._query[name], True
        return _MISSING, False

    def secret(self, name: str, *, min_length: int, max_length: int) -> str:
        """A required secret (a password): from the JSON body only, never the query string."""
        if name in self._query:
            raise secret_in_query(name, f"'{name}' must be sent in the JSON body, never in "
                                        "the URL (the URL is kept in logs); nothing was done")
        value = self._body.get(name, _MISSING)
        if value is _MISSING or value is None:
            raise invalid_field(name, f"'{name}' is required (in the JSON body)")
        if not isinstance(value, str):
            raise invalid_field(name, f"'{name}' must be a string")
        _require_unicode(name, value)  # the hasher encodes it to UTF-8
        if not (min_length <= len(value) <= max_length):
            raise invalid_field(name, f"'{name}' must have {min_length} to {max_length} "
                                      "characters")
        return value

    def has(self, name: str) -> bool:
        return self.raw(name)[0] is not _MISSING

    def id(self, name: str, *, required: bool = True) -> int | None:
        """A positive 64-bit integer id."""
        return self.integer(name, required=required, minimum=1, maximum=INT64_MAX)

    def integer(self, name: str, *, required: bool = True, minimum: int | None = None,
                maximum: int | None = None, default: int | None = None) -> int | None:
        value, textual = self.raw(name)
        if value is _MISSING or value is None or (textual and value == ""):
            if required:
                raise invalid_field(name, f"'{name}' is required")
            return default
        signed = minimum is None or minimum < 0
        if textual:
            if not (_INTEGER_TEXT if signed else _UNSIGNED_TEXT).fullmatch(value):
                sign = "an optional '-' and " if signed else ""
                raise invalid_field(name, f"'{name}' must be an integer: {sign}the digits 0-9, "
                                          "nothing else")
            value = int(value)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise invalid_field(name, f"'{name}' must be an integer")
        low = -(2**63) if minimum is None else minimum
        high = INT64_MAX if maximum is None else maximum
        if value < low or value > high:
            raise invalid_field(name, f"'{name}' must be between {low} and {high}")
        return value

    def number(self, name: str, *, minimum: float, maximum: float, default: float) -> float:
        value, textual = self.raw(name)
        if value is _MISSING or value is None or (textual and value == ""):
            return default
        if isinstance(value, str):  # the query string's, or a JSON string
            pattern = _DECIMAL_TEXT if minimum < 0 else _UNSIGNED_DECIMAL_TEXT
            if len(value) > _TEXT_MAX or not pattern.fullmatch(value):
                raise invalid_field(name, f"'{name}' must be a decimal number written with "
                                          "the digits 0-9 (e.g. 2.5)")
            number = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # a JSON integer of hundreds of digits
                number = float("nan")  # out of range below
        else:
            raise invalid_field(name, f"'{name}' must be a number")
        if not (minimum <= number <= maximum):
            raise invalid_field(name, f"'{name}' must be between {minimum:g} and {maximum:g}")
        return number

    def string(self, name: str, *, required: bool = True, max_length: int | None = None,
               min_length: int = 0) -> str | None:
        value, _ = self.raw(name)
        if value is _MISSING or value is None:
            if required:
                raise invalid_field(name, f"'{name}' is required")
            return None
        if not isinstance(value, str):
            raise invalid_field(name, f"'{name}' must be a string")
        if "\x00" in value:
            raise invalid_field(name, f"'{name}' must not contain NUL characters")
        _require_unicode(name, value)
        if len(value) < min_length:
            raise invalid_field(name, f"'{name}' must have at least {min_length} characters")
        if max_length is not None and len(value) > max_length:
            raise invalid_field(name, f"'{name}' must have at most {max_length} characters")
        return value

    def id_list(self, name: str, *, max_items: int = 1000) -> list[int]:
        value, textual = self.raw(name)
        if value is _MISSING or value is None:
            return []
        if textual:
            parts = [p for p in value.split(",") if p.strip()]
            value = parts
        if not isinstance(value, list):
            raise invalid_field(name, f"'{name}' must be a list of ids")
        if len(value) > max_items:
            raise invalid_field(name, f"'{name}' may hold at most {max_items} ids")
        out = []
        for i, item in enumerate(value):
            single = Params({name: item} if not textual else {}, {name: item} if textual else {})
            try:
                out.append(single.id(name))
            except Exception:
                raise invalid_field(name, f"'{name}[{i}]' must be a positive integer id") from None
        return out

    def value(self, name: str, *, required: bool = True) -> Any:
        value, _ = self.raw(name)
        if value is _MISSING:
            if required:
                raise invalid_field(name, f"'{name}' is required")
            return None
        return value


def _is_unicode(text: str) -> bool:
    """Whether `text` holds no lone surrogate (an undecodable byte, or a JSON `\\ud800`)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _require_unicode(name: str, value: str) -> None:
    """JSON's `\\ud800` escapes decode to lone surrogates: valid JSON, but no text that UTF-8
    (the database, a password hash) can hold."""
    if not _is_unicode(value):
        raise invalid_field(name, f"'{name}' is not valid Unicode text")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """An empty body is an empty object; anything else must be a UTF-8 JSON object."""
    if not body or body.isspace():
        return {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_json("the body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           parse_int=_bounded_int, object_pairs_hook=_unique_names)
    except RecursionError:
        raise _too_deep_error() from None
    except ValueError as exc:
        raise invalid_json(f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise invalid_json("the body must be a JSON object")
    if body.count(b"[") + body.count(b"{") > JSON_DEPTH_MAX and _too_deep(value):
        raise _too_deep_error()
    return value


def _too_deep_error() -> HTTPError:
    return invalid_json(f"the body's arrays and objects are nested more than {JSON_DEPTH_MAX} "
                        "levels deep")


def _too_deep(value: Any) -> bool:
    """Whether arrays and objects nest more than JSON_DEPTH_MAX levels: one level at a time,
    without recursion (json.loads builds only dicts and lists as containers)."""
    level = [value]
    depth = 1
    while level:
        if depth > JSON_DEPTH_MAX:
            return True
        inner: list[Any] = []
        for item in level:
            inner += [child for child in (item.values() if item.__class__ is dict else item)
                      if child.__class__ is dict or child.__class__ is list]
        level = inner
        depth += 1
    return False


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, whose names must differ (I-JSON): with a name twice, Python keeps the
    last value, where another reader (a proxy, a filter) may take the first."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"the name {name!r} appears twice in one object")
            seen.add(name)
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


def _bounded_int(text: str) -> int:
    """Python refuses to read integers of over 4,300 digits, with advice for Python
    programmers; say it in the client's terms. (Shorter big ones are range-checked later.)"""
    if len(text) > _INT_DIGITS_MAX:
        raise ValueError(f"a number has {len(text)} digits; the most is {_INT_DIGITS_MAX}")
    return int(text)


def _finite_float(text: str) -> float:
    """`1e400` is JSON, but Python reads it as inf, which would be written back out as
    `Infinity` (not JSON) wherever the value is echoed, e.g. in a /notify event."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large (beyond a 64-bit float)")
    return value
