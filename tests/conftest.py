"""Shared fixtures: database backends (SQLite always, PostgreSQL required in CI) and real nodes."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from support import NodeProcess, require_pg

_names = itertools.count(1)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def backend_url(request, tmp_path_factory) -> str:
    """A fresh, empty database of each kind for the session."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'hachat.db'}"
    require_pg()
    import dbutil

    url = dbutil.create_pg_database()
    request.addfinalizer(lambda: dbutil.drop_pg_database(url))
    return url


@pytest.fixture(scope="session")
def api_node(backend_url, tmp_path_factory) -> NodeProcess:
    """One active node (no peer) per backend, shared by the API tests of the session."""
    workdir = tmp_path_factory.mktemp("node")
    node = NodeProcess({"DATABASE_URL": backend_url, "IS_ACTIVE": "true", "PEER_URL": "",
                        "ADMIN_TOKEN": "admin-secret"}, workdir, name="api-node")
    node.start()
    node.wait_active()
    yield node
    node.stop()


@pytest.fixture
def unique():
    """Unique, valid usernames per call: unique('ana') -> 'ana_17_4242'."""
    pid = os.getpid() % 10000

    def make(prefix: str = "u") -> str:
        return f"{prefix}_{next(_names)}_{pid}"

    return make


@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path


def pytest_sessionfinish(session, exitstatus):
    """In CI nothing may be skipped: a skipped test is one that did not run, so the run fails.
    (Locally, skips say what is missing and the run still passes.)"""
    if os.environ.get("CI") != "true" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        names = ", ".join(sorted({r.nodeid for r in skipped})[:10])
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped, which CI does not allow: {names}",
                            red=True)
        session.exitstatus = 1
