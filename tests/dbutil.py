"""Database helpers any test suite may reuse (import with `tests/` on sys.path: `import dbutil`).

PostgreSQL: the server named by HACHAT_TEST_PG_URL (default
postgresql+psycopg://postgres@127.0.0.1:5432/postgres; its database is only used to CREATE and
DROP the per-session test databases). When it is unreachable, tests that need it are skipped,
or fail when CI=true or HACHAT_REQUIRE_PG=1.
"""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import URL, make_url

PG_URL_ENV = "HACHAT_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TEST_DB_PREFIX = "hachat_test_"


def pg_admin_url() -> URL:
    url = make_url(os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _connect_kwargs(url: URL) -> dict:
    kwargs = {"host": url.host or "127.0.0.1", "port": url.port or 5432,
              "user": url.username or "postgres", "dbname": url.database or "postgres",
              "connect_timeout": 3}
    if url.password:
        kwargs["password"] = url.password
    return kwargs


def pg_required() -> bool:
    """True when missing PostgreSQL must fail the run rather than skip (CI)."""
    return (os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
            or os.environ.get("HACHAT_REQUIRE_PG", "").strip() == "1")


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    """None when the server answers, else why not (checked once per process)."""
    try:
        with psycopg.connect(**_connect_kwargs(pg_admin_url()), autocommit=True) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def pg_available() -> bool:
    return _probe() is None


def require_pg_or_skip() -> None:
    """Skip the calling test when PostgreSQL is unreachable; fail instead in CI."""
    reason = _probe()
    if reason is None:
        return
    message = (f"PostgreSQL at {pg_admin_url().render_as_string(hide_password=True)} is "
               f"unreachable ({reason}); set {PG_URL_ENV} to point at one")
    if pg_required():
        pytest.fail(message + " [required: CI=true or HACHAT_REQUIRE_PG=1]", pytrace=False)
    pytest.skip(message)


def create_pg_database() -> str:
    """Create an empty, uniquely named database; return its SQLAlchemy URL."""
    admin = pg_admin_url()
    name = f"{TEST_DB_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(**_connect_kwargs(admin), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return admin.set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    """Drop a database made by `create_pg_database`, disconnecting anyone still in it."""
    name = make_url(url).database
    if not name or not name.startswith(TEST_DB_PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    with psycopg.connect(**_connect_kwargs(pg_admin_url()), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(sql.Identifier(name)))


def sqlite_url(tmp_path: Path) -> str:
    """A SQLite URL for a file (not yet created) inside `tmp_path`."""
    return f"sqlite:///{Path(tmp_path) / 'hachat.db'}"


def reset_database(db) -> None:
    """Empty every hachat table of an upgraded database and reset the lease and stream floor,
    so one upgraded PostgreSQL database can serve many tests."""
    from sqlalchemy import text

    tables = ["events", "messages", "memberships", "chat_groups", "auth_tokens", "users"]
    with db.write() as s:
        if db.dialect == "postgresql":
            s.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                s.execute(text(f"DELETE FROM {table}"))
        s.execute(text("UPDATE stream_meta SET floor = 0 WHERE id = 1"))
        s.execute(text("UPDATE lease SET holder = NULL, holder_url = NULL, epoch = 0, "
                       "expires_at = 0, acquired_at = 0 WHERE id = 1"))


def post_one(s, user_id: int, group_id: int, content: str, epoch: int,
             client_id: str | None = None):
    """(message, created) for one message posted through `chat.post_messages`."""
    from hachat.store import chat

    (result,) = chat.post_messages(
        s, [chat.MessageDraft(user_id, group_id, content, client_id)], epoch)
    assert result.outcome in (chat.PostOutcome.CREATED, chat.PostOutcome.EXISTING), result
    return result.message, result.outcome is chat.PostOutcome.CREATED
