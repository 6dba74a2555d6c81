"""One frozen settings object, built once at start from the environment and `.env`.

Nothing below the composition root reads `os.environ`; everything receives the pieces
of `Settings` it needs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


@dataclass(frozen=True)
class HTTPSettings:
    """What the socket server needs: no chat knowledge here."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 16
    max_header_bytes: int = 16 * 1024
    # The biggest body the API needs is ~50 KB (a 4,000-character message, every character
    # escaped); parsing a bigger one holds the GIL long enough to stall every connection.
    max_body_bytes: int = 128 * 1024
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    shutdown_grace: float = 10.0
    backlog: int = 1024
    max_connections: int = 20_000  # fewer if the open-file limit allows fewer (server.py)
    # From one address at most (0: no limit); loopback (a proxy on this machine) is not held
    # to it, so that one client cannot take every connection.
    max_connections_per_address: int = 512
    # file descriptors kept for everything but connections (see `server.fit_open_files`)
    fd_reserve: int = 64


@dataclass(frozen=True)
class ClusterSettings:
    """Roles, lease and the peer monitor (the original "sync manager")."""

    node_id: str
    public_url: str
    is_active: bool = True
    peer_url: str | None = None
    health_interval: float = 0.5
    health_timeout: float = 0.4
    health_failures: int = 3
    lease_ttl: float = 1.5
    lease_renew_interval: float = 0.25


@dataclass(frozen=True)
class Settings:
    """Every setting hachat reads, with its default."""

    http: HTTPSettings
    cluster: ClusterSettings
    database_url: str
    admin_token: str | None = None
    log_level: str = "INFO"
    event_retention_seconds: float = 7 * 24 * 3600
    status_timeout_default: float = 25.0
    poll_timeout_max: float = 60.0
    db_pool_size: int = 16
    login_rate: float = 20.0
    login_burst: int = 40
    extra: Mapping[str, str] = field(default_factory=dict)


# name -> (default, description); .env.example is generated from the same facts by hand.
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(f"{name} must be true or false, not {raw!r}")


def _number(env: Mapping[str, str], name: str, default, kind=float, minimum=None,
            maximum=None):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise SettingsError(f"{name} must be {what}, not {raw!r}") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, not {raw!r}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be at most {maximum}, not {raw!r}")
    return value


def _http_url(env: Mapping[str, str], name: str) -> str | None:
    """An http(s)://host[:port][/path] URL without its trailing slash, or None when empty."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # a port out of range or not a number raises ValueError
    except ValueError:
        ok = False
    if not ok:
        raise SettingsError(f"{name} must be an http:// or https:// URL such as "
                            f"http://localhost:8081, not {raw!r}")
    return raw.rstrip("/")


SUPPORTED_DATABASES = ("sqlite", "postgresql", "postgres")


def _check_database_url(url: str, name: str) -> str:
    """Refuse, with a message naming `name`, a URL hachat cannot use; return it unchanged."""
    scheme, sep, rest = url.partition("://")
    backend = scheme.split("+", 1)[0].lower()
    if not sep or not scheme:
        raise SettingsError(f"{name} must be a database URL such as sqlite:///data/hachat.db "
                            f"or postgresql://user@host:5432/hachat, not {url!r}")
    if backend not in SUPPORTED_DATABASES:
        raise SettingsError(f"{name}: hachat supports sqlite and postgresql, not {scheme!r} "
                            "(e.g. postgresql://user@host:5432/hachat)")
    if backend == "sqlite":
        path = rest.split("?", 1)[0]
        if path in ("", "/", "/:memory:") or "mode=memory" in rest:
            raise SettingsError(f"{name} must name a SQLite file (two connections share it), "
                                f"e.g. sqlite:///data/hachat.db, not {url!r}")
    return url


def database_url_from(env: Mapping[str, str], base_dir: Path) -> str:
    """DATABASE_URL wins; else the original DB_* variables name PostgreSQL; else SQLite."""
    url = (env.get("DATABASE_URL") or "").strip()
    if url:
        _check_database_url(url, "DATABASE_URL")
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix):]
        return url
    if env.get("DB_NAME") or env.get("DB_HOST"):
        user = quote(env.get("DB_USER", "postgres"), safe="")
        password = env.get("DB_PASSWORD", "")
        auth = f"{user}:{quote(password, safe='')}" if password else user
        host = env.get("DB_HOST", "localhost")
        port = _number(env, "DB_PORT", 5432, int, 1, 65535)
        name = env.get("DB_NAME", "hachat")
        return f"postgresql+psycopg://{auth}@{host}:{port}/{name}"
    return f"sqlite:///{base_dir / 'data' / 'hachat.db'}"


def load_settings(env: Mapping[str, str] | None = None, *, dotenv: bool = True,
                  base_dir: Path | None = None) -> Settings:
    """Build `Settings` from `env` (default: the process environment plus `.env`)."""
    if env is None:
        if dotenv:
            from dotenv import load_dotenv

            load_dotenv(Path.cwd() / ".env", override=False)
        env = os.environ
    base = base_dir or Path.cwd()
    port = _number(env, "PORT", 8080, int, 0, 65535)
    host = env.get("HOST", "127.0.0.1")
    advertised_host = "localhost" if host in ("0.0.0.0", "::", "") else host
    http = HTTPSettings(
        host=host,
        port=port,
        workers=_number(env, "WORKERS", 16, int, 1),
        max_header_bytes=_number(env, "MAX_HEADER_BYTES", 16 * 1024, int, 1024),
        max_body_bytes=_number(env, "MAX_BODY_BYTES", 128 * 1024, int, 1),
        header_timeout=_number(env, "HEADER_TIMEOUT", 10.0, float, 0.1),
        keepalive_timeout=_number(env, "KEEPALIVE_TIMEOUT", 75.0, float, 0.1),
        shutdown_grace=_number(env, "SHUTDOWN_GRACE", 10.0, float, 0.0),
        backlog=_number(env, "BACKLOG", 1024, int, 1),
        max_connections=_number(env, "MAX_CONNECTIONS", 20_000, int, 1),
        max_connections_per_address=_number(env, "MAX_CONNECTIONS_PER_ADDRESS", 512, int, 0),
        # Besides connections the process holds the database pools' connections (up to
        # 2 x DB_POOL_SIZE, plus a few; on SQLite each is up to three files), logs, the
        # listener, the poller.
        fd_reserve=64 + 6 * _number(env, "DB_POOL_SIZE", 16, int, 1),
    )
    peer = _http_url(env, "PEER_URL")
    cluster = ClusterSettings(
        node_id=(env.get("NODE_ID") or "").strip() or f"{socket.gethostname()}:{port}",
        public_url=_http_url(env, "PUBLIC_URL") or f"http://{advertised_host}:{port}",
        is_active=_bool(env, "IS_ACTIVE", True),
        peer_url=peer,
        health_interval=_number(env, "HEALTH_INTERVAL", 0.5, float, 0.01),
        health_timeout=_number(env, "HEALTH_TIMEOUT", 0.4, float, 0.01),
        health_failures=_number(env, "HEALTH_FAILURES", 3, int, 1),
        lease_ttl=_number(env, "LEASE_TTL", 1.5, float, 0.1),
        lease_renew_interval=_number(env, "LEASE_RENEW_INTERVAL", 0.25, float, 0.01),
    )
    if cluster.lease_renew_interval * 2 > cluster.lease_ttl:
        raise SettingsError("LEASE_RENEW_INTERVAL must be at most half of LEASE_TTL")
    level = (env.get("LOG_LEVEL") or "INFO").strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {level!r}")
    return Settings(
        http=http,
        cluster=cluster,
        database_url=database_url_from(env, base),
        admin_token=(env.get("ADMIN_TOKEN") or "").strip() or None,
        log_level=level,
        event_retention_seconds=_number(env, "EVENT_RETENTION_SECONDS", 7 * 24 * 3600.0, float, 1.0),
        status_timeout_default=_number(env, "STATUS_TIMEOUT", 25.0, float, 0.0),
        poll_timeout_max=_number(env, "POLL_TIMEOUT_MAX", 60.0, float, 1.0),
        db_pool_size=_number(env, "DB_POOL_SIZE", 16, int, 1),
        login_rate=_number(env, "LOGIN_RATE", 20.0, float, 0.01),
        login_burst=_number(env, "LOGIN_BURST", 40, int, 1),
    )
