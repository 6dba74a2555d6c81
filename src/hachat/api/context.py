"""Everything a handler may use, built once by the composition root."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hachat.api.throttle import RateLimiter, SideLane
from hachat.settings import Settings

if TYPE_CHECKING:
    from hachat.api.auth import Authenticator
    from hachat.api.group_commit import MessageCommitter
    from hachat.cluster.keeper import LeaseKeeper
    from hachat.cluster.node import Node
    from hachat.realtime.hub import EventHub
    from hachat.realtime.status import StatusWatch
    from hachat.store.db import Database


@dataclass
class ApiContext:
    settings: Settings
    db: Database
    node: Node
    keeper: LeaseKeeper
    hub: EventHub
    status: StatusWatch
    auth: Authenticator
    static_files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    server_stats: Callable[[], dict] = dict
    login_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(20.0, 40))
    # Wrong passwords per username, from any address: 10, then one every 6 s (password guessing
    # from many addresses). Only failures spend; while none is left, every login of that name
    # waits (a right password too: otherwise the answer would still tell a guess right).
    failed_logins: RateLimiter = field(default_factory=lambda: RateLimiter(1 / 6, 10))
    # Password hashing runs here, never on the server's worker pool (see throttle.SideLane).
    login_lane: SideLane = field(default_factory=lambda: SideLane(2, 64, name="login"))
    # Writes chat messages in batches (group commit); set by the composition root.
    committer: MessageCommitter | None = None
