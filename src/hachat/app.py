"""The composition root: builds every layer from one `Settings` and wires them together.

socket → request → handler → store/realtime → response; the cluster layer decides the role,
and role changes flow back out through listeners registered here.
"""

from __future__ import annotations

import errno
import logging
import mimetypes
import socket
import threading
import time
from importlib import resources

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from hachat.api.auth import Authenticator
from hachat.api.context import ApiContext
from hachat.api.errors import not_active
from hachat.api.group_commit import MessageCommitter
from hachat.api.router import Route
from hachat.api.routes import build_router
from hachat.api.throttle import RateLimiter
from hachat.cluster.keeper import LeaseKeeper
from hachat.cluster.monitor import PeerMonitor
from hachat.cluster.node import Node, NotActive
from hachat.cluster.roles import Role
from hachat.http.messages import Request
from hachat.http.server import HTTPServer
from hachat.realtime.hub import EventHub
from hachat.realtime.status import StatusWatch, process_first_version
from hachat.settings import Settings
from hachat.store import StoreError, StoreUnavailable
from hachat.store import chat as chat_store
from hachat.store import events as event_store
from hachat.store.db import Database, mask_url
from hachat.store.lease import assert_holder

log = logging.getLogger("hachat")


class StartupError(Exception):
    """The node cannot start. The message, one line, says what is wrong and what to do."""


# The server refused us for good (no such database, no such user, wrong password): waiting
# will not help, so start-up gives up at once instead of retrying.
_REFUSED_FOR_GOOD = ("does not exist", "authentication failed", "no pg_hba.conf entry")


def refused_for_good(exc: BaseException) -> bool:
    return any(words in str(exc) for words in _REFUSED_FOR_GOOD)


def database_problem(exc: BaseException, url: str) -> str:
    """One line for a database that cannot be used at start-up: what is wrong, what to do."""
    target = make_url(url)
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if target.get_backend_name() == "sqlite":
        return (f"cannot use the SQLite database {target.database}: {reason.split(': ')[-1]}; "
                "check DATABASE_URL and the file's permissions")
    where = f"{target.host or 'localhost'}:{target.port or 5432}"
    detail = reason.rsplit("failed: ", 1)[-1].replace("FATAL:  ", "").strip()
    name = target.database or "postgres"
    if "does not exist" in detail and detail.startswith("database"):
        return (f"the PostgreSQL database {name!r} does not exist on {where}: create it "
                f"(createdb -h {target.host or 'localhost'} -p {target.port or 5432} "
                f"-U {target.username or 'postgres'} {name}, or CREATE DATABASE {name}) "
                "or fix DATABASE_URL")
    if "authentication failed" in detail or detail.startswith("role"):
        return (f"PostgreSQL on {where} refused the login ({detail}): fix the user or password "
                "in DATABASE_URL (or DB_USER / DB_PASSWORD)")
    if isinstance(exc, StoreUnavailable):
        return (f"cannot connect to the database at {where} ({detail}): is PostgreSQL running "
                "there? Check DATABASE_URL (or DB_HOST / DB_PORT)")
    return f"database error at start-up ({mask_url(url)}): {reason}"


def listen_problem(exc: OSError, host: str, port: int) -> str:
    """One line for a listening socket that cannot be opened: what is wrong, what to do."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return (f"cannot listen on {where}: the host name {host!r} does not resolve; set HOST "
                "to an address of this machine (127.0.0.1, or 0.0.0.0 for every interface)")
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: the address is already in use (another hachat node "
                "or program listens there); stop it or set PORT to a free port")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"cannot listen on {where}: permission denied (ports below 1024 need "
                "privileges); set PORT to 1024 or above")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {where}: {host} is not an address of this machine; set HOST "
                "to one of its addresses (127.0.0.1, or 0.0.0.0 for every interface)")
    return f"cannot listen on {where}: {exc.strerror or exc}; check HOST and PORT"


def load_static_files() -> dict[str, tuple[bytes, str]]:
    """The browser client, read once at start (it is small) and served from memory."""
    files: dict[str, tuple[bytes, str]] = {}
    folder = resources.files("hachat.web").joinpath("static")
    if not folder.is_dir():
        return files
    for entry in folder.iterdir():
        if entry.is_file():
            kind = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind in ("application/javascript",):
                kind += "; charset=utf-8"
            files[entry.name] = (entry.read_bytes(), kind)
    return files


class HachatNode:
    """One hachat node: HTTP server, database, role machine, event hub."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # A paused process must not keep the lease row locked past the lease itself: its open
        # transaction is ended by the server after about one lease term of silence.
        try:
            self.db = Database(settings.database_url, pool_size=settings.db_pool_size,
                               idle_in_transaction_timeout=max(1.0, settings.cluster.lease_ttl))
        except OSError as exc:  # the SQLite file's folder cannot be made
            raise StartupError(f"cannot create the SQLite database "
                               f"{make_url(settings.database_url).database}: "
                               f"{exc.strerror or exc} ({exc.filename}); check DATABASE_URL "
                               "and the folder's permissions") from exc
        except (ValueError, sa_exc.ArgumentError) as exc:
            raise StartupError(f"DATABASE_URL: {exc}") from exc
        self.node = Node(settings.cluster)
        self.server = HTTPServer(self, settings.http)
        self.hub = EventHub(self.server.loop)
        # Versions unique to this process: a client carrying one across a failover or a
        # restart never names this node's current version by chance.
        self.status = StatusWatch(self.server.loop, first_version=process_first_version())
        self.auth = Authenticator(settings.admin_token)
        self.monitor = PeerMonitor(settings.cluster, self.node)
        self.keeper = LeaseKeeper(settings.cluster, self.node, self.db, self.monitor,
                                  self._prepare_activation)
        self.ctx = ApiContext(settings=settings, db=self.db, node=self.node, keeper=self.keeper,
                              hub=self.hub, status=self.status, auth=self.auth,
                              static_files=load_static_files(),
                              server_stats=lambda: self.server.stats(),
                              login_limiter=RateLimiter(settings.login_rate,
                                                        settings.login_burst))
        self.committer = MessageCommitter(self.ctx)
        self.ctx.committer = self.committer
        self.router = build_router(self.ctx)
        self.node.subscribe(self._on_transition)
        # The leader and epoch a passive or fallen node learns from the lease row or its peer
        # change its /health and answer /subscribe/status too, not only its own role changes.
        self.node.watch(lambda node: self.status.publish(node.snapshot()))
        self.status.publish(self.node.snapshot())
        self._stop = threading.Event()
        self._pruner = threading.Thread(target=self._prune_loop, name="event-pruner", daemon=True)

    # The HTTP layer's Application protocol.
    def resolve(self, request: Request) -> Route:
        return self.router.resolve(request)

    def _prepare_activation(self, epoch: int) -> None:
        """Runs after the lease is taken, before the node serves writes as active."""
        with self.db.read() as session:
            last = event_store.max_position(session)
        self.hub.reset(last)
        self.auth.clear()  # another node may have revoked tokens while we were not leading
        log.info("stream resumes after position %d under epoch %d", last, epoch)

    def _on_transition(self, old: Role, new: Role, node: Node) -> None:
        self.status.publish(node.snapshot())
        if old is Role.ACTIVE:
            gone = not_active(node.leader_url if new is not Role.FALLEN else None)
            self.hub.close_all(gone.to_response())

    def _prune_loop(self) -> None:
        retention = self.settings.event_retention_seconds
        period = min(3600.0, max(1.0, retention / 10))
        while not self._stop.wait(period):
            if not self.node.is_active:
                continue
            try:
                node_id, epoch = self.node.write_claim()
                with self.db.write() as session:
                    assert_holder(session, node_id, epoch)
                    pruned = event_store.prune_events(session, retention)
                    # A retry older than the stream's retention is not a retry any more.
                    chat_store.prune_tombstones(session, retention)
                if pruned:
                    log.info("pruned %d events older than %.0f s", pruned, retention)
            except (StoreError, NotActive) as exc:
                log.warning("event pruning skipped: %s", exc)
            except Exception:
                log.exception("event pruning failed; trying again next period")

    def upgrade_schema(self, attempts: int = 5) -> None:
        """Bring the schema to head; two nodes starting together may race, so retry."""
        for attempt in range(1, attempts + 1):
            try:
                self.db.upgrade()
                return
            except Exception as exc:
                if attempt == attempts or refused_for_good(exc):
                    raise
                log.warning("schema upgrade attempt %d of %d failed (%s); retrying", attempt,
                            attempts, exc)
                time.sleep(0.3 * attempt)

    def start(self) -> tuple[str, int]:
        """Migrate, bind, start the cluster threads. Returns the bound address.

        Raises `StartupError` when the database cannot be used or the address cannot be
        listened on (nothing is left running then)."""
        try:
            self.upgrade_schema()
        except (StoreError, sa_exc.SQLAlchemyError, OSError) as exc:
            self.db.dispose()
            raise StartupError(database_problem(exc, self.settings.database_url)) from exc
        try:
            address = self.server.bind()
        except OSError as exc:
            self.db.dispose()
            http = self.settings.http
            raise StartupError(listen_problem(exc, http.host, http.port)) from exc
        self.monitor.start()
        self.committer.start()
        self.keeper.start()
        self._pruner.start()
        return address

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        """Hand the lease over at once, then drain the HTTP server."""
        self._stop.set()
        try:
            self.keeper.stop(release=True)
        finally:
            self.monitor.stop()
            self.server.shutdown()
            self.committer.stop()
            self.db.dispose()
