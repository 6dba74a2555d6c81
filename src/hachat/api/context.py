"""Everything a handler may use, built once by the composition root."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hachat.settings import Settings

if TYPE_CHECKING:
    from hachat.api.auth import Authenticator
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
