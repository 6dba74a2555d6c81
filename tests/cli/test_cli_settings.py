"""Settings come from the environment (and .env), with the original DB_* names."""

from __future__ import annotations

from pathlib import Path

import pytest

from hachat.settings import SettingsError, load_settings


def settings(**env):
    return load_settings(env, base_dir=Path("/srv/chat"))


def test_defaults_run_on_sqlite():
    s = settings()
    assert s.database_url == "sqlite:////srv/chat/data/hachat.db"
    assert s.http.port == 8080 and s.cluster.is_active is True and s.cluster.peer_url is None
    assert s.cluster.lease_renew_interval * 2 <= s.cluster.lease_ttl


def test_original_db_variables_name_postgresql():
    s = settings(DB_USER="chat", DB_PASSWORD="p@ss word", DB_HOST="db", DB_PORT="5433",
                 DB_NAME="chat_db")
    assert s.database_url == "postgresql+psycopg://chat:p%40ss%20word@db:5433/chat_db"


def test_database_url_wins_and_is_normalised():
    s = settings(DATABASE_URL="postgres://u@h/d", DB_NAME="ignored")
    assert s.database_url == "postgresql+psycopg://u@h/d"


@pytest.mark.parametrize("name,value", [("PORT", "x"), ("IS_ACTIVE", "maybe"),
                                        ("HEALTH_FAILURES", "0"), ("LOG_LEVEL", "LOUD"),
                                        ("LEASE_RENEW_INTERVAL", "1.0")])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        settings(**{name: value})


def test_peer_and_node_settings():
    s = settings(PORT="8081", IS_ACTIVE="false", PEER_URL="http://localhost:8080/",
                 NODE_ID="b")
    assert s.cluster.peer_url == "http://localhost:8080"
    assert s.cluster.is_active is False and s.cluster.node_id == "b"
    assert s.cluster.public_url == "http://127.0.0.1:8081"
