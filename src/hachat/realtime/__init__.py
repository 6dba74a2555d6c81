"""Real-time delivery: stream positions and long-poll waiters (EventHub), node state (StatusWatch).

Imports nothing from hachat but `hachat.http.messages`.
"""

from .events import Event
from .hub import EventHub, Reservation, Ticket
from .status import StatusWatch

__all__ = ["Event", "EventHub", "Reservation", "StatusWatch", "Ticket"]
