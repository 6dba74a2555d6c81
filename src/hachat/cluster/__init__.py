"""Active/passive roles: the role machine, the database lease keeper and the peer monitor.

Wiring (the composition root does this):

    node = Node(settings.cluster)
    node.subscribe(on_role_change)                  # (old, new, node), e.g. close long-polls
    monitor = PeerMonitor(settings.cluster, node)
    keeper = LeaseKeeper(settings.cluster, node, db, monitor, prepare_activation)
    monitor.start(); keeper.start()                 # keeper.start waits for the start decision
    ...                                             # writes: node_id, epoch = node.write_claim()
    keeper.stop(release=True); monitor.stop()       # graceful: hands the lease over at once
"""

from hachat.cluster.keeper import LeaseKeeper
from hachat.cluster.monitor import PeerMonitor, PeerUnreachable, fetch_health
from hachat.cluster.node import Node, NotActive
from hachat.cluster.roles import TRANSITIONS, InvalidTransition, Role, allowed

__all__ = [
    "TRANSITIONS",
    "InvalidTransition",
    "LeaseKeeper",
    "Node",
    "NotActive",
    "PeerMonitor",
    "PeerUnreachable",
    "Role",
    "allowed",
    "fetch_health",
]
