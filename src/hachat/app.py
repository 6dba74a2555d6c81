"""The composition root: builds every layer from one `Settings` and wires them together.

socket → request → handler → store/realtime → response; the cluster layer decides the role,
and role changes flow back out through listeners registered here.
"""

from __future__ import annotations

import logging
import mimetypes
import threading
import time
from importlib import resources

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
from hachat.realtime.status import StatusWatch
from hachat.settings import Settings
from hachat.store import StoreError
from hachat.store import chat as chat_store
from hachat.store import events as event_store
from hachat.store.db import Database
from hachat.store.lease import assert_holder

log = logging.getLogger("hachat")


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
        self.db = Database(settings.database_url, pool_size=settings.db_pool_size,
                           idle_in_transaction_timeout=max(1.0, settings.cluster.lease_ttl))
        self.node = Node(settings.cluster)
        self.server = HTTPServer(self, settings.http)
        self.hub = EventHub(self.server.loop)
        self.status = StatusWatch(self.server.loop)
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
                if attempt == attempts:
                    raise
                log.warning("schema upgrade attempt %d failed (%s); retrying", attempt, exc)
                time.sleep(0.3 * attempt)

    def start(self) -> tuple[str, int]:
        """Migrate, bind, start the cluster threads. Returns the bound address."""
        self.upgrade_schema()
        address = self.server.bind()
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
