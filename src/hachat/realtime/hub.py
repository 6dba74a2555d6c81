"""EventHub: stream positions, the visible horizon, the replay buffer and long-poll waiters.

Writes (on worker threads, active node only):

    with hub.reservation() as r:            # takes the next stream position
        with db.write() as s:
            ...insert the event row with position r.position...
        r.event = Event(r.position, ...)    # set ONLY after the commit succeeded
    # on exit: hub.complete(ticket, r.event)  (None = abandoned: the position stays a hole)

Reads: a reader may only look at positions <= `visible_position()`, the highest P such that
every position reserved so far <= P is completed (committed or abandoned). A transaction that
commits late therefore holds the horizon back instead of being skipped (the Synapse trap).

Long-poll (GET /events?since=C), on a worker thread:

    upto = hub.visible_position()            # read BEFORE the query
    rows = events for the user in (C, upto]
    if rows: answer them
    d = hub.wait(user_id, group_ids, since=C, seen_upto=upto, timeout=..., render=render)
    if d is None: re-run the query (the replay buffer no longer reaches back to upto)
    else: return d

`wait` looks at the replay buffer under the hub lock, so an event that became visible after
`upto` was read is answered at once; later ones reach the waiter through the fan-out.

Threads: `reserve`, `complete`, `visible_position`, `wait`, `reset`, `close_all` and `stats`
are thread-safe. The fan-out runs on the loop thread (scheduled with `call_soon_threadsafe`);
one pending fan-out at a time drains every newly visible event in position order.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from hachat.http.messages import Deferred, LoopHandle, Response, dumps

from .events import Event

log = logging.getLogger(__name__)

Render = Callable[[list[Event], int], Response]

# Events that change who belongs to a group; their target is the member concerned.
MEMBERSHIP_KINDS = frozenset({"member.added", "member.removed"})

_consume = deque(maxlen=0).extend  # run an iterator to its end, in C

_RENDER_FAILED = Response(500, dumps({"error": "internal", "message": "could not render events"}))


@dataclass(frozen=True, slots=True)
class Ticket:
    """A reserved stream position. Complete it exactly once with `EventHub.complete`."""

    position: int
    generation: int


class Reservation:
    """What `EventHub.reservation()` yields. Set `.event` right after the commit succeeds."""

    __slots__ = ("ticket", "event")

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.event: Event | None = None

    @property
    def position(self) -> int:
        return self.ticket.position


class _Waiter:
    """One parked long-poll. Indexed under each of its groups and under its user."""

    __slots__ = ("hub", "user_id", "group_ids", "since", "seen_upto", "render", "deferred",
                 "registered")

    def __init__(self, hub: EventHub, user_id: int, group_ids: frozenset[int], since: int,
                 seen_upto: int, timeout: float, render: Render) -> None:
        self.hub = hub
        self.user_id = user_id
        self.group_ids = group_ids
        self.since = since
        self.seen_upto = seen_upto
        self.render = render
        self.registered = False
        self.deferred = Deferred(timeout, self.on_timeout, self.on_cancel)

    def on_timeout(self) -> Response:
        self.hub._unregister(self)
        return self.render([], self.since)

    def on_cancel(self) -> None:
        self.hub._unregister(self)


class EventHub:
    """In-process stream positions and long-poll delivery. See the module docstring."""

    def __init__(self, loop: LoopHandle, buffer_size: int = 20000) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self._loop = loop
        self._lock = threading.Lock()
        self._generation = 0  # 0 = never reset: reserve() refuses
        self._next = 1  # the position the next reserve() hands out
        self._visible = 0
        self._head = 0  # the newest committed event's position
        self._completed: dict[int, Event | None] = {}  # completed, above the horizon
        self._buffer: deque[Event] = deque(maxlen=buffer_size)
        # Every visible event with position > _floor is in _buffer.
        self._floor = 0
        self._by_group: dict[int, set[_Waiter]] = {}
        self._by_user: dict[int, set[_Waiter]] = {}
        self._count = 0
        self._pending: list[Event] = []  # visible, not yet fanned out
        self._fanout_scheduled = False
        self._closed: Response | None = None  # set by close_all, cleared by reset

    # -- positions -----------------------------------------------------------------------
    def reset(self, last_position: int) -> None:
        """This node became active; `last_position` is the database's highest position.

        The next `reserve()` returns last_position + 1; tickets of earlier generations are
        ignored when completed. Waiters still parked (if `close_all` was not called) are
        answered with no events and their own cursor, so they re-query the database.
        """
        with self._lock:
            self._generation += 1
            self._next = last_position + 1
            self._visible = last_position
            self._head = last_position
            self._completed.clear()
            self._buffer.clear()
            self._floor = last_position
            self._pending.clear()
            self._closed = None
            waiters = self._take_all_locked()
        if waiters:
            self._loop.call_soon_threadsafe(self._answer_empty, waiters)

    def reserve(self) -> Ticket:
        """Allocate the next stream position. Every ticket must be completed exactly once."""
        with self._lock:
            if self._generation == 0:
                raise RuntimeError("EventHub.reserve() before reset(): positions unknown")
            position = self._next
            self._next = position + 1
            return Ticket(position, self._generation)

    @contextmanager
    def reservation(self) -> Iterator[Reservation]:
        """`with hub.reservation() as r:` ... commit ...; `r.event = ev`. Completes on exit
        with `r.event` (even when the block raises after setting it: the row is committed)."""
        r = Reservation(self.reserve())
        try:
            yield r
        finally:
            self.complete(r.ticket, r.event)

    def complete(self, ticket: Ticket, event: Event | None) -> None:
        """The ticket's transaction committed `event`, or was abandoned (`None`)."""
        position = ticket.position
        if event is not None and event.position != position:
            raise ValueError(f"event position {event.position} != ticket position {position}")
        schedule = False
        with self._lock:
            if ticket.generation != self._generation:
                log.debug("ignoring completion of position %d from generation %d",
                          position, ticket.generation)
                return
            visible = self._visible
            completed = self._completed
            if position <= visible or position >= self._next or position in completed:
                log.warning("ignoring duplicate or unknown completion of position %d", position)
                return
            if position != visible + 1:
                completed[position] = event  # waits for the gap below it
                return
            new: list[Event] = [] if event is None else [event]
            visible = position
            while completed:
                nxt = visible + 1
                if nxt not in completed:
                    break
                ev = completed.pop(nxt)
                visible = nxt
                if ev is not None:
                    new.append(ev)
            self._visible = visible
            if not new:
                return
            self._head = new[-1].position
            buf = self._buffer
            maxlen = buf.maxlen
            for ev in new:
                if len(buf) == maxlen:
                    self._floor = buf[0].position  # about to be evicted
                buf.append(ev)
            self._pending.extend(new)
            if not self._fanout_scheduled:
                self._fanout_scheduled = schedule = True
        if schedule:
            try:
                self._loop.call_soon_threadsafe(self._fanout)
            except BaseException:
                with self._lock:
                    self._fanout_scheduled = False
                raise

    def visible_position(self) -> int:
        with self._lock:
            return self._visible

    def head_position(self) -> int:
        """The position of the newest committed event (or the one `reset` started from).

        The cursor to hand a client that asks where the stream is now. Not
        `visible_position()`: that may sit on an abandoned position, which a node taking over
        later would hand out again, so a client holding it could skip a new event.
        """
        with self._lock:
            return self._head

    # -- waiting -------------------------------------------------------------------------
    def wait(self, user_id: int, group_ids: set[int] | frozenset[int], since: int,
             seen_upto: int, timeout: float, render: Render) -> Deferred | None:
        """Park a long-poll for events after `seen_upto` (the visible position the caller's
        query covered) for this user's groups and for the user.

        Returns a Deferred (already resolved if matching events became visible meanwhile),
        or None when the replay buffer no longer reaches back to `seen_upto` + 1: the caller
        must re-query the database. `render(events, cursor)` builds the response: with the
        matching events and the last one's position, or with ([], since) on timeout. Pass a
        stable, hashable callable (a function or bound method, not a per-request closure):
        responses are shared between waiters that get the same events with the same render.
        """
        groups = group_ids if isinstance(group_ids, frozenset) else frozenset(group_ids)
        with self._lock:
            closed = self._closed
            if closed is None:
                if seen_upto < self._floor:
                    return None
                matched: list[Event] = []
                if self._visible > seen_upto:
                    for ev in reversed(self._buffer):
                        if ev.position <= seen_upto:
                            break
                        if ev.group_id in groups or ev.target_user_id == user_id:
                            matched.append(ev)
                if any(ev.target_user_id == user_id and ev.kind in MEMBERSHIP_KINDS
                       for ev in matched):
                    return None  # membership changed since the caller's query: re-query
                if not matched:
                    waiter = _Waiter(self, user_id, groups, since, seen_upto, timeout, render)
                    self._register_locked(waiter)
                    return waiter.deferred
        deferred = Deferred(timeout, lambda: render([], since))
        if closed is not None:
            deferred.resolve(closed)
        else:
            matched.reverse()
            deferred.resolve(render(matched, matched[-1].position))
        return deferred

    def close_all(self, response: Response) -> int:
        """Answer every parked waiter with `response` (e.g. 503 not_active when this node
        stops being active); until the next `reset()`, `wait()` answers it at once too.
        Returns how many waiters were answered."""
        with self._lock:
            self._closed = response
            waiters = self._take_all_locked()
        return sum(1 for w in waiters if w.deferred.resolve(response))

    def requery_all(self) -> int:
        """Answer every parked waiter with no events and its own cursor, so each re-reads the
        database. For when a commit's outcome is unknown: its row may exist without the hub
        having seen it, and no waiter may skip past it."""
        with self._lock:
            waiters = self._take_all_locked()
        if waiters:
            self._loop.call_soon_threadsafe(self._answer_empty, waiters)
        return len(waiters)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "waiters": self._count,
                "groups": len(self._by_group),
                "users": len(self._by_user),
                "buffer": len(self._buffer),
                "buffer_floor": self._floor,
                "visible_position": self._visible,
                "next_position": self._next,
                "in_flight": self._next - 1 - self._visible - len(self._completed),
                "completed_above_visible": len(self._completed),
                "pending_fanout": len(self._pending),
                "generation": self._generation,
                "closed": self._closed is not None,
            }

    # -- internals (indexes: under self._lock) -------------------------------------------
    def _register_locked(self, w: _Waiter) -> None:
        by_group = self._by_group
        for g in w.group_ids:
            s = by_group.get(g)
            if s is None:
                by_group[g] = {w}
            else:
                s.add(w)
        s = self._by_user.get(w.user_id)
        if s is None:
            self._by_user[w.user_id] = {w}
        else:
            s.add(w)
        w.registered = True
        self._count += 1

    def _unregister_locked(self, w: _Waiter) -> None:
        if not w.registered:
            return
        w.registered = False
        self._count -= 1
        by_group = self._by_group
        for g in w.group_ids:
            s = by_group.get(g)
            if s is not None:
                s.discard(w)
                if not s:
                    del by_group[g]
        s = self._by_user.get(w.user_id)
        if s is not None:
            s.discard(w)
            if not s:
                del self._by_user[w.user_id]

    def _unregister_many_locked(self, waiters: Iterable[_Waiter],
                                cleared: set[int] | frozenset[int] = frozenset()) -> None:
        """`_unregister_locked` for many waiters. `cleared`: groups all of whose waiters are
        among `waiters`; their entries are dropped whole instead of waiter by waiter."""
        by_group = self._by_group
        by_user = self._by_user
        for g in cleared:
            del by_group[g]
        touched: set[int] = set()
        n = 0
        for w in waiters:
            if not w.registered:
                continue
            w.registered = False
            n += 1
            groups = w.group_ids
            if len(groups) > 4:  # the per-group loop in C
                rest = groups - cleared if cleared else groups
                _consume(map(set.discard, map(by_group.__getitem__, rest), repeat(w)))
                touched |= rest
            else:
                for g in groups:
                    if g not in cleared:
                        by_group[g].discard(w)
                        touched.add(g)
            s = by_user[w.user_id]
            s.discard(w)
            if not s:
                del by_user[w.user_id]
        for g in touched:
            if not by_group[g]:
                del by_group[g]
        self._count -= n

    def _unregister(self, w: _Waiter) -> None:
        with self._lock:
            self._unregister_locked(w)

    def _take_all_locked(self) -> list[_Waiter]:
        waiters = [w for s in self._by_user.values() for w in s]
        for w in waiters:
            w.registered = False
        self._by_group.clear()
        self._by_user.clear()
        self._count = 0
        return waiters

    def _answer_empty(self, waiters: list[_Waiter]) -> None:
        """Loop thread: answer waiters dropped by reset() with no events."""
        for w in waiters:
            try:
                response = w.render([], w.since)
            except Exception:
                log.exception("render failed")
                response = _RENDER_FAILED
            w.deferred.resolve(response)

    def _fanout(self) -> None:
        """Loop thread: deliver every pending visible event to the waiters it matches."""
        with self._lock:
            events = self._pending
            self._pending = []
            self._fanout_scheduled = False
            if not events:
                return
            if len(events) == 1:
                single = self._match_one_locked(events[0])
                if not single:
                    return
                batches: list[tuple[list[_Waiter], list[Event]]] = [(single, events)]
            else:
                batches = self._match_many_locked(events)
        for waiters, evs in batches:
            self._deliver(waiters, evs)

    def _match_one_locked(self, ev: Event) -> list[_Waiter]:
        """The waiters `ev` wakes (unregistered). The common case: one event, many waiters;
        kept free of per-waiter allocations."""
        pos = ev.position
        g = ev.group_id
        u = ev.target_user_id
        hit: list[_Waiter] = []
        cleared: frozenset[int] = frozenset()
        if g is not None:
            members = self._by_group.get(g)
            if members:
                hit = [w for w in members if pos > w.seen_upto]
                if len(hit) == len(members):
                    cleared = frozenset((g,))
        if u is not None:
            mine = self._by_user.get(u)
            if mine:  # those not already matched through the group
                hit.extend([w for w in mine if pos > w.seen_upto and g not in w.group_ids])
        if hit:
            self._unregister_many_locked(hit, cleared)
        return hit

    def _match_many_locked(self, events: list[Event]
                           ) -> list[tuple[list[_Waiter], list[Event]]]:
        """Several events at once: gather per waiter every event it matches, in order, then
        group the waiters by the (identical) list of events they get."""
        by_group = self._by_group
        by_user = self._by_user
        woken: dict[_Waiter, list[Event]] = {}
        for ev in events:
            pos = ev.position
            for s in (by_group.get(ev.group_id) if ev.group_id is not None else None,
                      by_user.get(ev.target_user_id)
                      if ev.target_user_id is not None else None):
                if not s:
                    continue
                for w in s:
                    if pos > w.seen_upto:
                        lst = woken.get(w)
                        if lst is None:
                            woken[w] = [ev]
                        elif lst[-1] is not ev:  # matched by group and by user
                            lst.append(ev)
        if not woken:
            return []
        keys = woken.keys()
        cleared = {g for g in {ev.group_id for ev in events}
                   if g in by_group and by_group[g] <= keys}
        self._unregister_many_locked(woken, cleared)
        groups: dict[tuple[int, ...], tuple[list[_Waiter], list[Event]]] = {}
        for w, evs in woken.items():
            key = tuple([e.position for e in evs])
            entry = groups.get(key)
            if entry is None:
                groups[key] = ([w], evs)
            else:
                entry[0].append(w)
        return list(groups.values())

    def _deliver(self, waiters: list[_Waiter], events: list[Event]) -> None:
        """Loop thread: answer `waiters`, which all get exactly `events`; render once per
        distinct render callable so they share one response body."""
        cursor = events[-1].position
        cache: dict[Any, Response] = {}
        # A waiter whose own membership changed parked with a stale set of groups: answer it
        # with no events and its own cursor, so that it re-reads the database with the new
        # membership (the same answer a client resuming from that cursor would get).
        regrouped = {e.target_user_id for e in events
                     if e.target_user_id is not None and e.kind in MEMBERSHIP_KINDS}
        for w in waiters:
            if regrouped and w.user_id in regrouped:
                self._answer_empty([w])
                continue
            key = w.render
            try:
                response = cache.get(key)
            except TypeError:  # an unhashable render callable: render per waiter
                key = response = None
            if response is None:
                try:
                    response = w.render(events, cursor)
                except Exception:
                    log.exception("render failed")
                    response = _RENDER_FAILED
                if key is not None:
                    cache[key] = response
            w.deferred.resolve(response)
