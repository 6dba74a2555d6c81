"""Store fixtures: every `db` test runs on a SQLite file and on PostgreSQL.

PostgreSQL: one fresh database per test session (created and upgraded once, emptied before
each test, dropped at the end). See tests/dbutil.py for how the server is found and when a
missing server skips or fails.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent.parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import dbutil  # noqa: E402
from hachat.store import Database  # noqa: E402

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="session")
def pg_session_url() -> Iterator[str]:
    """An upgraded PostgreSQL database shared by this test session."""
    dbutil.require_pg_or_skip()
    url = dbutil.create_pg_database()
    try:
        db = Database(url, pool_size=2)
        try:
            db.upgrade()
        finally:
            db.dispose()
        yield url
    finally:
        dbutil.drop_pg_database(url)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, request, tmp_path: Path) -> str:
    """URL of an upgraded, empty database of the current backend."""
    if backend == "sqlite":
        url = dbutil.sqlite_url(tmp_path)
        db = Database(url, pool_size=2)
        try:
            db.upgrade()
        finally:
            db.dispose()
        return url
    url = request.getfixturevalue("pg_session_url")
    db = Database(url, pool_size=2)
    try:
        dbutil.reset_database(db)
    finally:
        db.dispose()
    return url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """URL of a brand-new database with no schema at all."""
    if backend == "sqlite":
        yield dbutil.sqlite_url(tmp_path)
        return
    dbutil.require_pg_or_skip()
    url = dbutil.create_pg_database()
    try:
        yield url
    finally:
        dbutil.drop_pg_database(url)
