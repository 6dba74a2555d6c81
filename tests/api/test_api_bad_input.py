"""Every class of bad input gets a 4xx JSON answer naming the problem, and writes nothing."""

from __future__ import annotations

import pytest

from support import ChatUser, call


@pytest.fixture(scope="module")
def pair(api_node):
    import os
    tag = os.getpid()
    ana = ChatUser(api_node.url, f"bad_ana_{tag}")
    bea = ChatUser(api_node.url, f"bad_bea_{tag}")
    gid = ana("POST", "/groups", {"name": "bad", "memberIds": [bea.id]}).json["id"]
    return ana, bea, gid


def _count(user, gid):
    return len(user("GET", "/messages", {"groupId": gid, "limit": 200}).json["messages"])


BAD_POSTS = [
    # (body, status, field)
    (b"not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'"text"', 400, None),
    (b"\xff\xfe{}", 400, None),
    (b'{"groupId": 1, "content": NaN}', 400, None),
    ({"content": "x"}, 422, "groupId"),
    ({"groupId": "abc", "content": "x"}, 422, "groupId"),
    ({"groupId": 1.5, "content": "x"}, 422, "groupId"),
    ({"groupId": True, "content": "x"}, 422, "groupId"),
    ({"groupId": 2**63, "content": "x"}, 422, "groupId"),
    ({"groupId": -1, "content": "x"}, 422, "groupId"),
    ({"groupId": 0, "content": "x"}, 422, "groupId"),
    ({"GROUP": 1}, 422, "groupId"),
    ({"groupId": "GID"}, 422, "content"),
    ({"groupId": "GID", "content": ""}, 422, "content"),
    ({"groupId": "GID", "content": "   \n\t"}, 422, "content"),
    ({"groupId": "GID", "content": "\u200b\u200d\ufeff "}, 422, "content"),
    ({"groupId": "GID", "content": 12}, 422, "content"),
    ({"groupId": "GID", "content": None}, 422, "content"),
    ({"groupId": "GID", "content": "x" * 4001}, 422, "content"),
    ({"groupId": "GID", "content": "a\u0000b"}, 422, "content"),
    ({"groupId": "GID", "content": "\ud800"}, 422, "content"),
    ({"groupId": "GID", "content": "x", "clientMessageId": ""}, 422, "clientMessageId"),
    ({"groupId": "GID", "content": "x", "clientMessageId": 5}, 422, "clientMessageId"),
    ({"groupId": "GID", "content": "x", "userId": "me"}, 422, "userId"),
]


@pytest.mark.parametrize("body,status,field", BAD_POSTS)
def test_bad_message_posts_write_nothing(api_node, pair, body, status, field):
    ana, _, gid = pair
    before = _count(ana, gid)
    if isinstance(body, dict):
        body = {k: (gid if v == "GID" else v) for k, v in body.items()}
    reply = ana("POST", "/messages", body)
    assert reply.status == status, reply.raw
    assert set(reply.json) >= {"error", "message"}
    if field:
        assert reply.json["field"] == field
        assert field in reply.json["message"]
    assert _count(ana, gid) == before


def test_unknown_things_are_404(api_node, pair):
    ana, _, gid = pair
    assert ana("POST", "/messages", {"groupId": 9_000_000, "content": "x"}).status == 404
    assert ana("GET", "/messages", {"groupId": 9_000_000}).status == 404
    assert ana("DELETE", "/messages", {"messageId": 9_000_000}).status == 404
    assert ana("GET", "/group-users", {"groupId": 9_000_000}).status == 404
    assert ana("POST", "/groups", {"name": "g", "memberIds": [9_000_000]}).status == 404
    assert ana("GET", "/no/such/route").status == 404


def test_wrong_method_is_405_with_allow(api_node):
    reply = call(api_node.url, "PUT", "/messages", {})
    assert reply.status == 405
    assert set(reply.headers["allow"].split(", ")) == {"GET", "POST", "DELETE"}
    assert reply.json["error"] == "method_not_allowed"


def test_impersonation_is_403(api_node, pair):
    ana, bea, gid = pair
    before = _count(ana, gid)
    reply = ana("POST", "/messages", {"userId": bea.id, "groupId": gid, "content": "as bea"})
    assert reply.status == 403
    assert ana("GET", "/chats", {"userId": bea.id}).status == 403
    assert _count(ana, gid) == before


@pytest.mark.parametrize("auth", [None, "Bearer nope", "Basic abc", "Bearer", "bearer  "])
def test_missing_or_bad_token_is_401(api_node, pair, auth):
    _, _, gid = pair
    headers = {"Authorization": auth} if auth else {}
    reply = call(api_node.url, "POST", "/messages", {"groupId": gid, "content": "x"},
                 headers=headers)
    assert reply.status == 401 and reply.json["error"] == "unauthorized"


@pytest.mark.parametrize("body,field", [
    ({"password": "longenough"}, "username"),
    ({"username": "", "password": "longenough"}, "username"),
    ({"username": "x" * 33, "password": "longenough"}, "username"),
    ({"username": "bad name", "password": "longenough"}, "username"),
    ({"username": "..", "password": "longenough"}, "username"),
    ({"username": "-", "password": "longenough"}, "username"),
    ({"username": "ümlaut", "password": "longenough"}, "username"),
    ({"username": 5, "password": "longenough"}, "username"),
    ({"username": "okname"}, "password"),
    ({"username": "okname", "password": "short"}, "password"),
    ({"username": "okname", "password": "x" * 257}, "password"),
    ({"username": "okname", "password": "\ud800" * 9}, "password"),
    ({"username": "okname", "password": "longenough\udfff"}, "password"),
])
def test_bad_logins(api_node, body, field):
    reply = call(api_node.url, "POST", "/login", body)
    assert reply.status == 422 and reply.json["field"] == field


def test_a_password_that_is_not_unicode_text_is_422_for_an_existing_user(api_node, pair):
    """A lone surrogate (valid JSON escape, not text) cannot be hashed or checked."""
    ana, _, _ = pair
    reply = call(api_node.url, "POST", "/login",
                 {"username": ana.username, "password": "password123\ud800"})
    assert reply.status == 422 and reply.json["field"] == "password", reply.raw


def test_bad_query_params(api_node, pair):
    ana, _, gid = pair
    for query, field in [(f"groupId={gid}&limit=0", "limit"), (f"groupId={gid}&limit=201", "limit"),
                         (f"groupId={gid}&limit=x", "limit"), ("groupId=1e3", "groupId"),
                         (f"groupId={gid}&before=-4", "before"),
                         ("groupId=99999999999999999999999", "groupId")]:
        reply = ana("GET", f"/messages?{query}")
        assert reply.status == 422 and reply.json["field"] == field, (query, reply.raw)
    for query, field in [("since=abc", "since"), ("since=-1", "since"),
                         ("since=0&timeout=61", "timeout"), ("since=0&timeout=x", "timeout")]:
        reply = ana("GET", f"/events?{query}")
        assert reply.status == 422 and reply.json["field"] == field, (query, reply.raw)
    assert call(api_node.url, "GET", "/subscribe/status?timeout=-1").status == 422


def test_admin_routes_need_the_admin_token(api_node, pair):
    ana, _, _ = pair
    assert call(api_node.url, "POST", "/fall").status == 403
    assert ana("POST", "/fall").status == 403
    assert call(api_node.url, "POST", "/revive", token="wrong").status == 403
    assert call(api_node.url, "GET", "/health").json["status"] == "alive"


# Numbers in a query string, a path or a JSON string are ASCII digits only: str.isdigit(),
# int() and float() also take superscripts (500), other scripts' digits ("١" was 1) and "1_0".
ODD_NUMBERS = ["²", "١", "١٢", "𝟙", "1_0", "0x10", " 5", "5 ", "+5", "1e3", "½", "٣"]


@pytest.mark.parametrize("text", ODD_NUMBERS)
def test_odd_numbers_in_query_strings_are_422(api_node, pair, text):
    ana, _, gid = pair
    from urllib.parse import quote

    q = quote(text)
    for path, field in [(f"/messages?groupId={q}", "groupId"),
                        (f"/messages?groupId={gid}&limit={q}", "limit"),
                        (f"/messages?groupId={gid}&before={q}", "before"),
                        (f"/group-users?groupId={q}", "groupId"),
                        (f"/events?since={q}", "since")]:
        reply = ana("GET", path)
        assert reply.status == 422, (path, reply.status, reply.raw)
        assert reply.json["error"] == "invalid_field" and reply.json["field"] == field
    reply = ana("DELETE", f"/messages?messageId={q}")
    assert reply.status == 422 and reply.json["field"] == "messageId", reply.raw
    reply = ana("POST", f"/groups?name=n&memberIds={q}")
    assert reply.status == 422 and reply.json["field"] == "memberIds", reply.raw
    for path in (f"/groups/{q}/members", f"/notify/{q}"):
        reply = ana("POST", path, {"userId": ana.id, "message": "m"})
        assert reply.status == 422 and reply.json["field"] == "groupId", (path, reply.raw)
    reply = call(api_node.url, "GET", f"/subscribe/status?since={q}")
    assert reply.status == 422 and reply.json["field"] == "since", reply.raw


@pytest.mark.parametrize("text", ["1_0", "١", "²", "nan", "inf", "-inf", "0x1", " 1", "1e", "."])
def test_odd_timeouts_are_422(api_node, pair, text):
    ana, _, _ = pair
    from urllib.parse import quote

    reply = ana("GET", f"/events?since=0&timeout={quote(text)}")
    assert reply.status == 422 and reply.json["field"] == "timeout", reply.raw
    reply = ana("GET", "/events", {"since": 0, "timeout": text})
    assert reply.status == 422 and reply.json["field"] == "timeout", reply.raw
    reply = call(api_node.url, "GET", f"/subscribe/status?timeout={quote(text)}")
    assert reply.status == 422 and reply.json["field"] == "timeout", reply.raw


def test_plain_numbers_still_work(api_node, pair):
    ana, _, gid = pair
    assert ana("GET", f"/messages?groupId={gid}&limit=007").status == 200
    assert ana("GET", "/events?since=0&timeout=0.0").status == 200
    assert ana("GET", "/events?since=0&timeout=0").status == 200
    assert ana("GET", "/events", {"since": 0, "timeout": 0.001}).status == 200
    assert ana("GET", "/events", {"since": 0, "timeout": "0.5e-3"}).status == 200
    assert call(api_node.url, "GET", "/subscribe/status?timeout=.001").status == 200


def test_huge_json_numbers_are_422(api_node, pair):
    ana, _, gid = pair
    huge = b"1" + b"0" * 400
    for body, field in [(b'{"since": 0, "timeout": ' + huge + b"}", "timeout"),
                        (b'{"groupId": ' + huge + b"}", "groupId")]:
        reply = ana("GET", "/events" if b"since" in body else "/messages", body)
        assert reply.status == 422 and reply.json["field"] == field, reply.raw


# Text that shows nothing: white space, format characters (Cf), the Hangul fillers, the Braille
# blank, controls, and combining marks with nothing to sit on.
BLANK_TEXTS = ["\u200b", "\u3164", "\u2800", "\u0301", "\u115f\u1160", "\uffa0",
               "\u200b\u0301", " \u3164 \u2800 ", "\u034f", "\ufe0f", "\u2060\u00ad",
               "\U000e0041\U000e0042", "\u202e\u061c\u180e", "\x01\x7f", "\u20dd",
               "\u3000\u0301\u0302", "\u0903"]
SHOWN_TEXTS = ["a\u0301", "\U0001f44d", "\u2764\ufe0f", "\u3164a", "0", ".", "\u2800x",
               "\u65e5\u672c", "\u200bhi"]


@pytest.mark.parametrize("text", BLANK_TEXTS)
def test_blank_message_content_is_422(api_node, pair, text):
    ana, _, gid = pair
    before = _count(ana, gid)
    reply = ana("POST", "/messages", {"groupId": gid, "content": text})
    assert reply.status == 422, (text, reply.raw)
    assert reply.json["error"] == "invalid_field" and reply.json["field"] == "content"
    assert _count(ana, gid) == before


@pytest.mark.parametrize("text", BLANK_TEXTS)
def test_blank_group_names_are_422(api_node, pair, text):
    ana, _, _ = pair
    before = len(ana("GET", "/chats").json["chats"])
    reply = ana("POST", "/groups", {"name": text})
    assert reply.status == 422, (text, reply.raw)
    assert reply.json["error"] == "invalid_field" and reply.json["field"] == "name"
    assert len(ana("GET", "/chats").json["chats"]) == before


@pytest.mark.parametrize("text", SHOWN_TEXTS)
def test_text_that_shows_something_is_accepted(api_node, pair, text):
    ana, _, gid = pair
    posted = ana("POST", "/messages", {"groupId": gid, "content": text})
    assert posted.status == 201 and posted.json["content"] == text, posted.raw
    group = ana("POST", "/groups", {"name": text})
    assert group.status == 201 and group.json["name"] == text, group.raw


def test_is_blank():
    from hachat.api.text import is_blank

    for text in ["", " ", *BLANK_TEXTS]:
        assert is_blank(text), repr(text)
    for text in SHOWN_TEXTS:
        assert not is_blank(text), repr(text)


def test_a_password_in_the_query_string_is_refused(api_node, unique):
    """Regression: POST /login?username=..&password=.. logged in (or created the account);
    a URL ends up in proxy and server logs, so secrets come from the JSON body only."""
    from urllib.parse import quote

    name = unique("qs")
    for path, body in [(f"/login?username={name}&password=longenough", None),
                       ("/login?password=longenough", {"username": name}),
                       ("/login?password=longenough", {"username": name,
                                                       "password": "longenough"}),
                       (f"/login?PassWord=longenough&username={name}", None),
                       (f"/login?{quote('password')}=longenough&username={name}", None),
                       ("/login?pass%77ord=longenough", {"username": name})]:
        reply = call(api_node.url, "POST", path, body)
        assert reply.status == 400, (path, reply.raw)
        assert reply.json["error"] == "secret_in_query" and reply.json["field"] == "password"
        assert "body" in reply.json["message"]
    # nothing was created: the account is new to this login
    created = call(api_node.url, "POST", "/login", {"username": name, "password": "longenough"})
    assert created.status == 201, created.raw


def test_a_token_in_the_query_string_is_refused(api_node, pair):
    ana, _, gid = pair
    for path in (f"/events?token={ana.token}", f"/chats?access_token={ana.token}",
                 f"/messages?groupId={gid}&Token={ana.token}"):
        for token in (None, ana.token):  # with or without the header too
            reply = call(api_node.url, "GET", path, token=token)
            assert reply.status == 400, (path, reply.raw)
            assert reply.json["error"] == "secret_in_query"
            assert "Authorization" in reply.json["message"]
    # a query string without secrets is fine
    assert ana("GET", f"/messages?groupId={gid}").status == 200


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1" + b"0" * 400 + b".0",
                                    b"9" * 5000])
def test_json_numbers_beyond_a_double_are_refused_not_stored_as_infinity(api_node, pair, number):
    """Python reads them as inf, which would go out as `Infinity`: not JSON, and every member's
    /events stream from before that event would be unreadable by a JSON parser."""
    ana, _, gid = pair
    cursor = ana("GET", "/events").json["cursor"]
    reply = ana("POST", f"/notify/{gid}", b'{"message": {"x": ' + number + b"}}")
    assert reply.status == 400 and reply.json["error"] == "invalid_json", reply.raw
    assert "number" in reply.json["message"] and "sys." not in reply.json["message"]
    assert ana("POST", "/messages", b'{"groupId": %d, "content": "x", "userId": %s}'
               % (gid, number)).status == 400
    assert ana("GET", "/events", b'{"since": 0, "timeout": %s}' % number).status == 400
    later = ana("GET", f"/events?since={cursor}&timeout=0")
    assert later.status == 200 and later.json["events"] == [], later.raw


@pytest.mark.parametrize("depth", [150, 900, 984, 987, 5000])
def test_json_nested_too_deep_is_refused_not_stored_to_break_the_stream(api_node, pair, depth):
    """Regression: a /notify message nested ~985 levels deep was parsed and stored (200), but
    every later GET /events over its position failed with 500 (RecursionError while encoding
    the answer), so one member cut the whole group off its stream for the retention window.
    Bodies nested deeper than the documented limit are 400 invalid_json; nothing is stored."""
    ana, bea, gid = pair
    cursor = bea("GET", "/events").json["cursor"]
    body = b'{"message": ' + b"[" * depth + b"]" * depth + b"}"
    reply = ana("POST", f"/notify/{gid}", body)
    assert reply.status == 400 and reply.json["error"] == "invalid_json", reply.raw
    assert "nested" in reply.json["message"] and "recursion" not in reply.json["message"]
    assert ana("POST", "/messages", b'{"groupId": %d, "content": "x", "extra": %s}'
               % (gid, b"[" * depth + b"]" * depth)).status == 400
    later = bea("GET", f"/events?since={cursor}&timeout=0")
    assert later.status == 200 and later.json["events"] == [], later.raw


def test_json_nested_within_the_limit_is_delivered(api_node, pair):
    ana, bea, gid = pair
    cursor = bea("GET", "/events").json["cursor"]
    message = {"a": [[[{"b": [1]}]]]}
    for _ in range(90):
        message = [message]
    reply = ana("POST", f"/notify/{gid}", {"message": message})
    assert reply.status == 200, reply.raw
    later = bea("GET", f"/events?since={cursor}&timeout=0")
    assert later.status == 200 and later.json["events"][0]["data"]["message"] == message


def test_an_event_stored_too_deep_to_encode_does_not_break_the_stream(api_node, pair,
                                                                       backend_url):
    """Events written before the nesting limit (or by any future way around it) must not cut
    members off their stream: one that cannot be read or encoded is served with
    `"data": null, "unreadable": true`, and the events around it as usual."""
    from sqlalchemy import create_engine, make_url, text

    url = make_url(backend_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    ana, bea, gid = pair
    cursor = bea("GET", "/events").json["cursor"]
    first = ana("POST", f"/notify/{gid}", {"message": "before"}).json["eventId"]
    poisoned = ana("POST", f"/notify/{gid}", {"message": "poisoned"}).json["eventId"]
    last = ana("POST", f"/notify/{gid}", {"message": "after"}).json["eventId"]
    for depth in (984, 995):  # encodes no more / parses no more
        deep = '{"message":' + "[" * depth + "]" * depth + f',"from":{ana.id}}}'
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(text("UPDATE events SET payload = :p WHERE position = :pos"),
                             {"p": deep, "pos": poisoned})
        finally:
            engine.dispose()
        reply = bea("GET", f"/events?since={cursor}&timeout=0")
        assert reply.status == 200, reply.raw[:300]
        events = {e["id"]: e for e in reply.json["events"]}
        assert events[first]["data"]["message"] == "before"
        assert events[poisoned]["data"] is None and events[poisoned]["unreadable"] is True
        assert events[poisoned]["type"] == "group.notify"
        assert events[last]["data"]["message"] == "after"


def test_a_query_field_given_twice_is_422_not_silently_the_last(api_node, pair, unique):
    """Regression: `?memberIds=1&memberIds=2` (how many clients write a list) created the
    group with member 2 only, and `?groupId=1&groupId=2` read group 2: the last value won
    without a word. A field named twice in the query string is 422 naming it; nothing is
    done. (A list goes in one field, comma-separated, or in the JSON body.)"""
    ana, bea, gid = pair
    third = ChatUser(api_node.url, unique("third"))
    before = len(ana("GET", "/chats").json["chats"])
    reply = ana("POST", f"/groups?name=twice&memberIds={bea.id}&memberIds={third.id}")
    assert reply.status == 422 and reply.json["field"] == "memberIds", reply.raw
    assert "more than once" in reply.json["message"]
    assert len(ana("GET", "/chats").json["chats"]) == before
    reply = ana("GET", f"/messages?groupId={gid}&groupId=9000000")
    assert reply.status == 422 and reply.json["field"] == "groupId", reply.raw
    reply = call(api_node.url, "GET", "/subscribe/status?timeout=0&timeout=1")
    assert reply.status == 422 and reply.json["field"] == "timeout", reply.raw
    # one field, comma-separated, is the list form
    reply = ana("POST", f"/groups?name=once&memberIds={bea.id},{third.id}")
    assert reply.status == 201 and set(reply.json["memberIds"]) == {ana.id, bea.id, third.id}


def test_query_text_that_is_not_utf8_is_422_not_stored_as_replacement_characters(api_node, pair):
    """Regression: a body that is not UTF-8 is refused, but percent-encoded bytes in the query
    string were decoded with replacement: `content=caf%E9` (Latin-1 é) was stored as "caf\ufffd"
    and `name=%FF` made a group named "\ufffd". Such a field is 422 naming it; nothing is
    stored."""
    ana, _, gid = pair
    before = _count(ana, gid)
    chats = len(ana("GET", "/chats").json["chats"])
    reply = ana("POST", f"/messages?groupId={gid}&content=caf%E9")
    assert reply.status == 422 and reply.json["field"] == "content", reply.raw
    assert "UTF-8" in reply.json["message"]
    reply = ana("POST", "/groups?name=%FF%FE")
    assert reply.status == 422 and reply.json["field"] == "name", reply.raw
    assert _count(ana, gid) == before
    assert len(ana("GET", "/chats").json["chats"]) == chats
    reply = ana("GET", f"/messages?groupId={gid}&%FF=1")
    assert reply.status == 422 and reply.json["error"] == "invalid_field", reply.raw
    posted = ana("POST", f"/messages?groupId={gid}&content=caf%C3%A9")
    assert posted.status == 201 and posted.json["content"] == "caf\u00e9", posted.raw


def test_a_json_key_given_twice_is_400_not_silently_the_last(api_node, pair):
    """As for the query string: `{"groupId": 1, "groupId": 2}` acted on group 2, though a
    proxy or filter reading the first value would have seen group 1. A name twice in one
    JSON object (I-JSON, RFC 7493) is 400 invalid_json naming it; nothing is stored."""
    ana, _, gid = pair
    before = _count(ana, gid)
    body = b'{"groupId": %d, "content": "one", "content": "two"}' % gid
    reply = ana("POST", "/messages", body)
    assert reply.status == 400 and reply.json["error"] == "invalid_json", reply.raw
    assert "content" in reply.json["message"] and "twice" in reply.json["message"]
    reply = ana("POST", f"/notify/{gid}", b'{"message": {"a": 1, "a": 2}}')
    assert reply.status == 400 and reply.json["error"] == "invalid_json", reply.raw
    assert _count(ana, gid) == before
