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
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import monotonic
from typing import Any

from hachat.http.messages import Deferred, LoopHandle, Response
from hachat.http.wire import internal_error

from .events import Event

log = logging.getLogger(__name__)

Render = Callable[[list[Event], int], Response]

# Events that change who belongs to a group; their target is the member concerned.
MEMBERSHIP_KINDS = frozenset({"member.added", "member.removed"})

# How long an ended session is remembered: longer than a poll can take from authenticating
# to parking, so one that raced the logout is refused instead of parked.
ENDED_SESSION_MEMORY = 120.0

_consume = deque(maxlen=0).extend  # run an iterator to its end, in C

# A position whose transaction's outcome is unknown (the COMMIT's answer was lost): completed,
# but its row may or may not be stored, and the hub never holds its event.
_UNCERTAIN = object()

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

    __slots__ = ("hub", "user_id", "session", "group_ids", "since", "seen_upto", "render",
                 "deferred", "registered")

    def __init__(self, hub: EventHub, user_id: int, session: Hashable, group_ids: frozenset[int],
                 since: int, seen_upto: int, timeout: float, render: Render) -> None:
        self.hub = hub
        self.user_id = user_id
        self.session = session
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

    def __init__(self, loop: LoopHandle, buffer_size: int = 20000,
                 slice_seconds: float = 0.005) -> None:
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
        # Matched waiters not answered yet (loop thread only; see `_drain`).
        self._outbox: deque[_Delivery] = deque()
        self._undelivered = 0
        self._drain_scheduled = False
        self._slice_seconds = slice_seconds
        self._closed: Response | None = None  # set by close_all, cleared by reset
        # Sessions ended lately, oldest first: (user, session) -> (when, response). A poll
        # that authenticated just before the logout may reach wait() just after it.
        self._ended: dict[tuple[int, Hashable], tuple[float, Response]] = {}

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

    def complete(self, ticket: Ticket, event: Event | None, *, uncertain: bool = False
                 ) -> None:
        """The ticket's transaction committed `event`, or was abandoned (`None`).

        `uncertain`: its COMMIT's outcome is unknown (the answer was lost), so its event may be
        stored without the hub having it. When the horizon passes such a position, every
        parked waiter is answered with no events (it re-reads the database) and the buffer's
        floor moves up to it, so no reader takes a later event from the hub past it.
        """
        position = ticket.position
        if event is not None and (uncertain or event.position != position):
            raise ValueError(f"event {event.position} for ticket {position} "
                             f"(uncertain={uncertain})")
        done: Event | object | None = _UNCERTAIN if uncertain else event
        schedule = False
        requery: list[_Waiter] = []
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
                completed[position] = done  # waits for the gap below it
                return
            new: list[Event] = []
            doubt = 0  # the highest uncertain position the horizon passes now
            ev: Any = done
            visible = position
            while True:
                if ev is _UNCERTAIN:
                    doubt = visible
                elif ev is not None:
                    new.append(ev)
                nxt = visible + 1
                if nxt not in completed:
                    break
                ev = completed.pop(nxt)
                visible = nxt
            self._visible = visible
            if doubt:
                # The events after `doubt` are still buffered and fanned out, but nobody who
                # parked below it may get them from the hub: they would pass it unseen.
                self._floor = max(self._floor, doubt)
                requery = self._take_all_locked()
            if new:
                self._head = new[-1].position
                buf = self._buffer
                maxlen = buf.maxlen
                for ev in new:
                    if len(buf) == maxlen:
                        self._floor = max(self._floor, buf[0].position)  # about to be evicted
                    buf.append(ev)
                self._pending.extend(new)
                if not self._fanout_scheduled:
                    self._fanout_scheduled = schedule = True
        if requery:
            self._loop.call_soon_threadsafe(self._answer_empty, requery)
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

    def handed_out(self, position: int) -> bool:
        """True when this node has handed `position` out since it became active: its
        transaction committed or is still in flight. Writes commit concurrently (PostgreSQL),
        so an event's position may be answered to its writer (`POST /notify`'s `eventId`)
        before the positions below it are visible: such a cursor is not ahead of the stream."""
        with self._lock:
            return self._generation != 0 and position < self._next

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
             seen_upto: int, timeout: float, render: Render,
             session: Hashable = None) -> Deferred | None:
        """Park a long-poll for events after `seen_upto` (the visible position the caller's
        query covered) for this user's groups and for the user.

        Returns a Deferred (already resolved if matching events became visible meanwhile),
        or None when the replay buffer no longer reaches back to `seen_upto` + 1: the caller
        must re-query the database. `render(events, cursor)` builds the response: with the
        matching events and the last one's position, or with ([], since) on timeout. Pass a
        stable, hashable callable (a function or bound method, not a per-request closure):
        responses are shared between waiters that get the same events with the same render.
        `session` names the credential the caller waits under, for `end_session`.
        """
        groups = group_ids if isinstance(group_ids, frozenset) else frozenset(group_ids)
        with self._lock:
            closed = self._closed
            if closed is None and self._ended and session is not None:
                ended = self._ended.get((user_id, session))
                closed = ended[1] if ended is not None else None
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
                    waiter = _Waiter(self, user_id, session, groups, since, seen_upto, timeout,
                                     render)
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

    def end_session(self, user_id: int, session: Hashable, response: Response) -> int:
        """Answer `user_id`'s waiters parked under `session` with `response` (a 401 once
        that session's token is revoked: a poll parked before the logout must not go on
        delivering). The user's other sessions keep waiting. Returns how many were answered."""
        now = monotonic()
        with self._lock:
            ended = self._ended
            while ended:
                oldest = next(iter(ended))
                if now - ended[oldest][0] < ENDED_SESSION_MEMORY:
                    break
                del ended[oldest]
            ended.pop((user_id, session), None)
            ended[(user_id, session)] = (now, response)
            ending = [w for w in self._by_user.get(user_id, ()) if w.session == session]
            self._unregister_many_locked(ending)
        return sum(1 for w in ending if w.deferred.resolve(response))

    def requery_all(self) -> int:
        """Answer every parked waiter with no events and its own cursor, so each re-reads the
        database. (A commit whose outcome is unknown is completed with `uncertain=True`,
        which does this when the horizon passes its position.)"""
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
                "undelivered": self._undelivered,
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
        among `waiters`; their entries are dropped whole instead of waiter by waiter.

        The indexes are cut group by group with set operations (in C) rather than waiter by
        waiter: a fan-out to 5,000 waiters who share their other groups touches a handful of
        sets, not 15,000 entries one Python step at a time.
        """
        live: list[_Waiter] = []
        for w in waiters:
            if w.registered:  # skips duplicates too
                w.registered = False
                live.append(w)
        if not live:
            return
        by_group = self._by_group
        by_user = self._by_user
        for g in cleared:
            del by_group[g]
        gone = set(live)
        touched = set().union(*[w.group_ids for w in live])
        touched.difference_update(cleared)
        for g in touched:
            s = by_group[g]
            leaving = s & gone  # iterates the smaller of the two sets
            if len(leaving) == len(s):
                del by_group[g]
            else:
                s.difference_update(leaving)
        users = [w.user_id for w in live]
        _consume(map(set.discard, map(by_user.__getitem__, users), live))
        for u in set(users):
            if not by_user[u]:
                del by_user[u]
        self._count -= len(live)

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
                response = internal_error()
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
        outbox = self._outbox
        for waiters, evs in batches:
            outbox.append(_Delivery(waiters, evs))
            self._undelivered += len(waiters)
        if not self._drain_scheduled:
            self._drain()

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

    def _drain(self) -> None:
        """Loop thread: answer matched waiters from the outbox, oldest first, for at most
        `slice_seconds`; then let the loop take a turn (its sockets, timers and queued
        callbacks: the poster's own answer, /health, the next request) before going on.

        Without the slices a fan-out to N waiters holds the loop for N times the cost of one
        send (~15 us): 75 ms for 5,000 waiters, ~1 s for 60,000, long enough for a peer's
        health check to time out. The waiters still queued are unregistered already, so no
        later event can reach them out of order: each gets exactly its batch's events.
        """
        self._drain_scheduled = False
        outbox = self._outbox
        deadline = monotonic() + self._slice_seconds
        while outbox:
            done = outbox[0].deliver(deadline)
            self._undelivered -= done
            if outbox[0].remaining:
                break
            outbox.popleft()
        if outbox:
            self._drain_scheduled = True
            self._loop.call_soon_threadsafe(self._drain)


class _Delivery:
    """Waiters matched by one fan-out that all get exactly `events`, answered in slices."""

    __slots__ = ("waiters", "events", "next", "regrouped", "responses")

    STEP = 64  # waiters answered between two looks at the clock

    def __init__(self, waiters: list[_Waiter], events: list[Event]) -> None:
        self.waiters = waiters
        self.events = events
        self.next = 0
        # A waiter whose own membership changed parked with a stale set of groups: it is
        # answered with no events and its own cursor, so that it re-reads the database with
        # the new membership (the answer a client resuming from that cursor would get).
        self.regrouped = {e.target_user_id for e in events
                          if e.target_user_id is not None and e.kind in MEMBERSHIP_KINDS}
        self.responses: dict[Any, Response] = {}  # render callable -> its one response

    @property
    def remaining(self) -> int:
        return len(self.waiters) - self.next

    def response(self, render: Render) -> Response:
        """The response `render` gives for these events: rendered once, shared by every
        waiter with the same render (so the HTTP layer also renders its bytes once)."""
        try:
            response = self.responses.get(render)
        except TypeError:  # an unhashable render callable: render per waiter
            return self._render(render)
        if response is None:
            response = self.responses[render] = self._render(render)
        return response

    def _render(self, render: Render) -> Response:
        try:
            return render(self.events, self.events[-1].position)
        except Exception:
            log.exception("render failed")
            return internal_error()

    def deliver(self, deadline: float) -> int:
        """Answer waiters until they are all answered or `deadline` (monotonic) has passed;
        returns how many were answered."""
        waiters = self.waiters
        start = i = self.next
        n = len(waiters)
        regrouped = self.regrouped
        last_render: Any = None
        response: Response | None = None
        while i < n:
            stop = min(i + self.STEP, n)
            for k in range(i, stop):
                w = waiters[k]
                try:
                    if regrouped and w.user_id in regrouped:
                        w.hub._answer_empty([w])
                        continue
                    render = w.render
                    if render is not last_render or response is None:
                        response = self.response(render)
                        last_render = render
                    w.deferred.resolve(response)
                except Exception:  # one broken connection must not strand the others
                    log.exception("answering a long-poll failed")
            i = stop
            if monotonic() >= deadline:
                break
        if i < n:
            self.next = i
        else:  # done: drop the references at once
            self.waiters = []
            self.next = 0
        return i - start
