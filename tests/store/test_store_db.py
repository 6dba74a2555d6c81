"""Database: migrations, sessions, SQLite settings, error mapping, the upgrade script."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from hachat.store import Database, StoreError, StoreUnavailable, accounts, utcnow_iso
from hachat.store.models import Base

REPO = Path(__file__).resolve().parents[2]
TABLES = {"users", "auth_tokens", "chat_groups", "memberships", "messages", "events",
          "stream_meta", "lease", "alembic_version"}


# -- migrations --------------------------------------------------------------------------------

def test_upgrade_on_empty_database_creates_schema_and_seed_rows(empty_db_url):
    db = Database(empty_db_url, pool_size=2)
    try:
        assert db.schema_revision() is None
        db.upgrade()
        assert db.schema_revision() == Database.head_revision() == "0002"
        with db.read() as s:
            tables = set(inspect(s.connection()).get_table_names())
            assert tables >= TABLES
            lease = s.execute(text("SELECT holder, holder_url, epoch, expires_at FROM lease"))
            assert lease.all() == [(None, None, 0, 0.0)]
            assert s.execute(text("SELECT id, floor FROM stream_meta")).all() == [(1, 0)]
    finally:
        db.dispose()


def test_upgrade_is_idempotent(empty_db_url):
    db = Database(empty_db_url, pool_size=2)
    try:
        db.upgrade()
        with db.write() as s:
            accounts.create_user(s, "alice", "h")
        db.upgrade()
        db.upgrade()
        with db.read() as s:
            assert s.execute(text("SELECT count(*) FROM lease")).scalar() == 1
            assert s.execute(text("SELECT count(*) FROM stream_meta")).scalar() == 1
            assert accounts.get_user_by_username(s, "alice") is not None
        assert db.schema_revision() == Database.head_revision()
    finally:
        db.dispose()


def test_concurrent_upgrades_serialize(empty_db_url):
    errors: list[BaseException] = []

    def run():
        db = Database(empty_db_url, pool_size=1)
        try:
            db.upgrade()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    db = Database(empty_db_url, pool_size=1)
    try:
        assert db.schema_revision() == Database.head_revision()
    finally:
        db.dispose()


def test_connections_opening_a_new_sqlite_file_at_once_wait_for_each_other(tmp_path):
    """Switching a new SQLite file to WAL takes a lock that SQLite does not wait for through
    busy_timeout: connections opened together (several threads or nodes starting on one new
    file) must wait their turn instead of failing with "database is locked"."""
    for attempt in range(30):
        url = f"sqlite:///{tmp_path / f'new-{attempt}.db'}"
        errors: list[BaseException] = []
        start = threading.Barrier(6)

        def connect(read_only: bool, url=url, start=start, errors=errors) -> None:
            db = Database(url, pool_size=1)
            try:
                start.wait(5)
                with (db.read() if read_only else db.write()) as session:
                    session.execute(text("SELECT 1"))
                    time.sleep(0.02)  # others connect while this transaction is open
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                db.dispose()

        threads = [threading.Thread(target=connect, args=(i % 2 == 0,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [], f"attempt {attempt}: {errors[0]!r}"
        with sqlite3.connect(tmp_path / f"new-{attempt}.db") as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_upgrade_from_0001_keeps_the_data(empty_db_url):
    """A database made by an older release upgrades in place."""
    db = Database(empty_db_url, pool_size=1)
    try:
        db.upgrade("0001")
        assert db.schema_revision() == "0001"
        with db.write() as s:
            accounts.create_user(s, "early", "h")
        db.upgrade()
        assert db.schema_revision() == Database.head_revision() != "0001"
        with db.read() as s:
            assert accounts.get_user_by_username(s, "early") is not None
            assert s.execute(text("SELECT count(*) FROM message_tombstones")).scalar() == 0
    finally:
        db.dispose()


def test_migration_matches_models(db):
    """The ORM models and the migrations describe the same schema."""
    with db._write_engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(ctx, Base.metadata)
    assert diffs == []


# -- sessions ----------------------------------------------------------------------------------

def test_write_commits_and_objects_outlive_the_session(db):
    with db.write() as s:
        user = accounts.create_user(s, "Alice", "hash")
    assert user.id is not None and user.username == "Alice"  # not expired after commit
    with db.read() as s:
        again = accounts.get_user(s, user.id)
    assert again.username_key == "alice"
    assert again.created_at.tzinfo is not None
    assert again.created_at.utcoffset() == timedelta(0)
    assert abs(again.created_at - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_write_rolls_back_on_exception(db):
    with pytest.raises(RuntimeError), db.write() as s:
        accounts.create_user(s, "bob", "h")
        raise RuntimeError("boom")
    with db.read() as s:
        assert accounts.get_user_by_username(s, "bob") is None


def test_read_is_read_only(db):
    with pytest.raises(Exception) as info, db.read() as s:
        s.execute(text("UPDATE lease SET epoch = 99 WHERE id = 1"))
    assert not isinstance(info.value, StoreUnavailable)
    with db.read() as s:
        assert s.execute(text("SELECT epoch FROM lease")).scalar() == 0


def test_integrity_error_is_not_store_unavailable(db):
    with pytest.raises(IntegrityError), db.write() as s:
        s.execute(text("INSERT INTO memberships (group_id, user_id, added_at) "
                       "VALUES (12345, 67890, CURRENT_TIMESTAMP)"))


def test_programming_error_is_not_store_unavailable(db):
    with pytest.raises(Exception) as info, db.read() as s:
        s.execute(text("SELECT * FROM no_such_table"))
    assert not isinstance(info.value, StoreError)


def test_ping(db):
    assert db.ping() is True


def test_dialect(db, backend):
    assert db.dialect == backend


def test_unsupported_urls_are_refused():
    with pytest.raises(ValueError):
        Database("sqlite:///:memory:")
    with pytest.raises(ValueError):
        Database("mysql://x@localhost/y")


# -- unavailable -------------------------------------------------------------------------------

def test_closed_port_raises_store_unavailable_quickly():
    db = Database("postgresql+psycopg://postgres:secret@127.0.0.1:1/x")
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info, db.read() as s:
            s.execute(text("SELECT 1"))
        assert time.monotonic() - start < 5
        assert "secret" not in str(info.value)
        with pytest.raises(StoreUnavailable), db.write() as s:
            s.execute(text("SELECT 1"))
        with pytest.raises(StoreUnavailable):
            db.upgrade()
        assert db.ping() is False
        assert time.monotonic() - start < 5
    finally:
        db.dispose()


def test_sqlite_lock_held_too_long_raises_store_unavailable(tmp_path):
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    db = Database(url, pool_size=2, lock_timeout=0.3)
    try:
        db.upgrade()
        other = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            start = time.monotonic()
            with pytest.raises(StoreUnavailable), db.write() as s:
                s.execute(text("UPDATE lease SET epoch = 1"))
            assert time.monotonic() - start < 3
            with db.read() as s:  # WAL: readers are not blocked by a writer
                assert s.execute(text("SELECT epoch FROM lease")).scalar() == 0
        finally:
            other.execute("ROLLBACK")
            other.close()
        with db.write() as s:  # usable again
            s.execute(text("UPDATE lease SET epoch = 1"))
    finally:
        db.dispose()


# -- SQLite specifics --------------------------------------------------------------------------

def test_sqlite_pragmas_and_parent_directory(tmp_path):
    path = tmp_path / "deep" / "er" / "hachat.db"
    db = Database(f"sqlite:///{path}", pool_size=2)
    try:
        db.upgrade()
        assert path.exists()
        for session_factory in (db.read, db.write):
            with session_factory() as s:
                assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
                assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1
                assert s.execute(text("PRAGMA busy_timeout")).scalar() == 5000
                assert s.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
        with db.read() as s:
            assert s.execute(text("PRAGMA query_only")).scalar() == 1
    finally:
        db.dispose()


def test_sqlite_write_transaction_takes_the_write_lock_at_begin(tmp_path):
    """BEGIN IMMEDIATE: read-modify-write transactions from many threads lose no update."""
    db = Database(f"sqlite:///{tmp_path / 'h.db'}", pool_size=4)
    try:
        db.upgrade()

        def bump():
            for _ in range(10):
                with db.write() as s:
                    epoch = s.execute(text("SELECT epoch FROM lease WHERE id = 1")).scalar()
                    s.execute(text("UPDATE lease SET epoch = :e WHERE id = 1"), {"e": epoch + 1})

        threads = [threading.Thread(target=bump) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with db.read() as s:
            assert s.execute(text("SELECT epoch FROM lease")).scalar() == 80
    finally:
        db.dispose()


def test_sqlite_second_process_connection_sees_begin_immediate_lock(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'h.db'}", pool_size=2)
    try:
        db.upgrade()
        other = sqlite3.connect(tmp_path / "h.db", isolation_level=None, timeout=0)
        try:
            with db.write() as s:
                s.execute(text("SELECT 1"))  # first statement: BEGIN IMMEDIATE happened
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()
    finally:
        db.dispose()


# -- helpers -----------------------------------------------------------------------------------

def test_utcnow_iso():
    aware = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    assert utcnow_iso(aware) == "2025-01-02T03:04:05.678Z"
    plus_two = aware.astimezone(timezone(timedelta(hours=2)))
    assert utcnow_iso(plus_two) == "2025-01-02T03:04:05.678Z"
    assert utcnow_iso(aware.replace(tzinfo=None)) == "2025-01-02T03:04:05.678Z"
    now = utcnow_iso()
    assert now.endswith("Z") and len(now) == len("2025-01-02T03:04:05.678Z")


# -- the original entry point ------------------------------------------------------------------

def _run_upgrade_script(tmp_path: Path, database_url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    env["DATABASE_URL"] = database_url
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(REPO / "database" / "database.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_database_script_upgrades_sqlite(tmp_path):
    path = tmp_path / "data" / "via-script.db"
    done = _run_upgrade_script(tmp_path, f"sqlite:///{path}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and str(path) in done.stdout
    db = Database(f"sqlite:///{path}", pool_size=1)
    try:
        assert db.schema_revision() == Database.head_revision()
    finally:
        db.dispose()


def test_database_script_masks_password_and_reports_failure(tmp_path):
    done = _run_upgrade_script(tmp_path, "postgresql://postgres:hunter2@127.0.0.1:1/x")
    assert done.returncode == 1
    assert "hunter2" not in done.stdout + done.stderr
    assert "unavailable" in done.stderr


@pytest.mark.postgres
def test_database_script_upgrades_postgresql(tmp_path):
    import dbutil

    dbutil.require_pg_or_skip()
    url = dbutil.create_pg_database()
    try:
        done = _run_upgrade_script(tmp_path, url)
        assert done.returncode == 0, done.stderr
        assert "upgraded postgresql" in done.stdout
        db = Database(url, pool_size=1)
        try:
            assert db.schema_revision() == Database.head_revision()
        finally:
            db.dispose()
    finally:
        dbutil.drop_pg_database(url)
