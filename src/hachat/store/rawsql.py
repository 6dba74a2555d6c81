"""Plain SQL on the hot write path (every chat message runs these few statements).

The ORM costs hundreds of microseconds of Python per statement; a message takes six. These
helpers send fixed SQL strings straight to the driver through the session's connection (same
transaction), with `:name` parameters rewritten once per dialect to the driver's style.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from sqlalchemy.orm import Session

_NAMED = re.compile(r"(?<![:\w]):(\w+)")


@lru_cache(maxsize=128)
def driver_sql(sql: str, dialect: str) -> str:
    """`:name` placeholders as the driver wants them (psycopg: `%(name)s`; sqlite3 as is)."""
    if dialect == "postgresql":
        return _NAMED.sub(r"%(\1)s", sql)
    return sql


def run(session: Session, sql: str, params: dict[str, Any]) -> Any:
    """Execute `sql` in the session's transaction; returns the driver-level result."""
    conn = session.connection()
    return conn.exec_driver_sql(driver_sql(sql, conn.dialect.name), params)


def insert_many_returning(session: Session, sql: str,
                          params: list[dict[str, Any]]) -> list[Any]:
    """Run `sql` (a statement returning at most one row of one column) once per parameter
    set, in order, in the session's transaction; the first column of each, or None.

    PostgreSQL: psycopg's `executemany(returning=True)` sends every statement in pipeline
    mode, so the whole batch costs one round trip. SQLite runs in-process: a plain loop.
    """
    conn = session.connection()
    dialect = conn.dialect.name
    statement = driver_sql(sql, dialect)
    cursor = conn.connection.cursor()
    try:
        if dialect != "postgresql":
            out = []
            for one in params:
                row = cursor.execute(statement, one).fetchone()
                out.append(None if row is None else row[0])
            return out
        cursor.executemany(statement, params, returning=True)
        out = []
        while True:
            row = cursor.fetchone()
            out.append(None if row is None else row[0])
            if not cursor.nextset():
                break
        return out
    finally:
        cursor.close()


def run_many(session: Session, sql: str, params: list[dict[str, Any]]) -> None:
    """Execute `sql` once per parameter set (the driver's executemany: pipelined on
    PostgreSQL)."""
    conn = session.connection()
    conn.exec_driver_sql(driver_sql(sql, conn.dialect.name), params)


def dialect_of(session: Session) -> str:
    return session.get_bind().dialect.name


def timestamp_param(moment: datetime, dialect: str) -> Any:
    """A UTC timestamp as the column type would bind it (SQLite keeps naive UTC text)."""
    moment = moment.astimezone(timezone.utc)
    if dialect == "sqlite":
        return moment.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return moment


def timestamp_result(value: Any) -> datetime:
    """A timestamp read back by the driver, as an aware UTC datetime."""
    if isinstance(value, str):  # SQLite
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)
