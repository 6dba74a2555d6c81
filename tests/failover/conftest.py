from __future__ import annotations

import pytest
from harness import Pair

from support import ChatUser, require_pg


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_db(request, tmp_path):
    """A new empty database per test: the lease row is the whole cluster's state."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pair.db'}"
        return
    require_pg()
    import dbutil

    url = dbutil.create_pg_database()
    yield url
    dbutil.drop_pg_database(url)


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
