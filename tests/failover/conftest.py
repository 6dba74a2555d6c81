from __future__ import annotations

import pytest
from harness import Pair

from support import ChatUser, fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_db(request, tmp_path):
    """A new empty database per test: the lease row is the whole cluster's state."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def pair(fresh_db, tmp_path):
    p = Pair(fresh_db, tmp_path).start()
    yield p
    p.stop()


@pytest.fixture
def chat(pair):
    """A user and a group on the pair, made through the active node."""
    user = ChatUser(pair.a.url, "writer")
    gid = user("POST", "/groups", {"name": "ha"}).json["id"]
    return user, gid
