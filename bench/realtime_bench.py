"""Real-time delivery benchmark: thousands of parked long-polls on one hachat node (SQLite).

    python -m bench.realtime_bench            # the full run (10,000 clients; ~10 minutes)
    python -m bench.realtime_bench --quick    # CI smoke run (< 90 s; < 20 s with --peers none)
    python -m bench.realtime_bench --peers aiohttp,uvicorn   # which peer baselines (or none)

What it does:

1. Seeds a fresh SQLite database in a temporary directory straight through the store layer
   (users share one precomputed argon2 hash, so no /login is needed), then starts one node.
2. A load client spread over several processes (each an epoll loop over raw sockets) parks
   `GET /events?since=<cursor>&timeout=60` requests and stamps the arrival of each answer's
   first byte with `time.monotonic()` (CLOCK_MONOTONIC: one clock for every process on
   Linux), taken when `epoll.poll()` returns, so a stamp is never earlier than the arrival.
   It also keeps the kernel's own receive time of the answer (SO_TIMESTAMPNS), which does not
   depend on when the client process got a CPU to read it.
3. Measures (a) clients held (checked with GET /stats: hub.waiters) and the server's RSS while
   they wait; (b)/(c) for one message POSTed to a group whose members are all waiting, the time
   from just before the POST is written until each member's answer arrives (p50/p99/max,
   several rounds, median of the p99s); (d) connect-park-disconnect cycles: waiters and open
   connections back to baseline, and the server's RSS before and after.
4. Peer baselines (--peers): the same load client, sizes, rounds and pinning drive small
   long-polling broadcast servers from bench/peers/ (aiohttp; uvicorn + starlette with
   httptools and uvloop; waitress), a fresh process per phase, phases (a)-(c) only. Every wait
   is bounded (--peer-wait): a peer that cannot hold or answer everyone is reported with what
   it did. A last table puts hachat and the peers side by side with the ratio hachat/peer of
   the p99 (below 1: hachat faster).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import json
import multiprocessing as mp
import os
import select
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    KeepAliveHTTP,
    ManagedProcess,
    NodeProc,
    format_table,
    free_port,
    latency_summary,
    pinning_plan,
    raise_nofile_limit,
    read_rss_bytes,
    read_sched_ns,
    source_revision,
    verdict,
    wait_until_serving,
)

ADMIN_TOKEN = "bench-admin-" + os.urandom(6).hex()
PASSWORD = "bench password 1"
MiB = 1024 * 1024
# RSS may grow this much over the connect-wait-disconnect cycles and still count as "none".
RSS_GROWTH_TOLERANCE = 8 * MiB

TARGETS = {"clients": 10_000, "rss": 1024 * MiB, "p99_small": 30.0, "p99_big": 150.0}


# ============================================================================================
# Seeding
# ============================================================================================

@dataclass
class Seeded:
    poster_token: str
    tokens: list[str]  # one per waiting client, index = client number
    groups: dict[str, int]
    seconds: float


def seed_database(url: str, clients: int, small: int, big: int) -> Seeded:
    """Users u00000.. (the waiting clients) and `poster`, all with one precomputed argon2 hash;
    groups: g-small (poster + the first `small` clients), g-big (poster + the first `big`),
    and lobby (everyone; never posted to, it only makes each waiter watch several groups)."""
    from argon2 import PasswordHasher

    from hachat.store import accounts, chat
    from hachat.store.db import Database

    started = time.monotonic()
    password_hash = PasswordHasher().hash(PASSWORD)
    db = Database(url)
    try:
        db.upgrade()
        with db.write() as s:
            poster = accounts.create_user(s, "poster", password_hash)
            poster_token = accounts.issue_token(s, poster.id)
            ids: list[int] = []
            tokens: list[str] = []
            for i in range(clients):
                user = accounts.create_user(s, f"u{i:05d}", password_hash)
                ids.append(user.id)
                tokens.append(accounts.issue_token(s, user.id))
            groups = {
                "small": chat.create_group(s, "g-small", poster.id, ids[:small]).id,
                "big": chat.create_group(s, "g-big", poster.id, ids[:big]).id,
                "lobby": chat.create_group(s, "lobby", poster.id, ids).id,
            }
    finally:
        db.dispose()
    return Seeded(poster_token, tokens, groups, time.monotonic() - started)


# ============================================================================================
# The load client: one process, many raw sockets, one epoll loop
# ============================================================================================

NEW, CONNECTING, WAITING, IDLE = range(4)
MAX_CONNECTING = 64  # connects in progress per process at a time
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# The kernel's receive time of the data a recvmsg() returns (CLOCK_REALTIME, struct timespec);
# Linux's value on every architecture but a few (the module does not export it).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESTAMP_SPACE = socket.CMSG_SPACE(16)
_timespec = struct.Struct("qq").unpack_from


class Slot:
    """One client: its token, its socket and the answer it is waiting for."""

    __slots__ = ("index", "token", "sock", "state", "buf", "t_first", "t_kernel", "header_end",
                 "content_length", "request")

    def __init__(self, index: int, token: str) -> None:
        self.index = index
        self.token = token
        self.sock: socket.socket | None = None
        self.state = NEW
        self.buf = bytearray()
        self.t_first = 0.0
        self.t_kernel = 0.0  # when the kernel received the answer's first byte (time.time())
        self.header_end = -1
        self.content_length = -1
        self.request = b""


class ClientWorker:
    """Runs in a child process; obeys commands from the coordinator over a Pipe:

    ("arm", indices, since, timeout)  send GET /events on each (connecting first if needed);
                                      answers ("sent", sent, failed) once all are written
    ("collect", expected, seconds)    answers ("collected", results, waiting) once `expected`
                                      deliveries arrived or `seconds` passed
    ("close", indices|None, rst)      close sockets (RST when `rst`); answers ("closed", n)
    ("counts",)                       answers ("counts", {state: n, ...})
    ("stop",)                         exits

    A delivery is an answer with events (or an error status); an answer with no events (the
    long-poll timed out) re-arms the same socket from the cursor it carries.
    """

    def __init__(self, conn: Connection, host: str, port: int, source_ip: str,
                 tokens: dict[int, str]) -> None:
        self.conn = conn
        self.address = (host, port)
        self.source_ip = source_ip
        self.slots = {i: Slot(i, t) for i, t in tokens.items()}
        # epoll itself rather than `selectors`: it does less per ready socket, so the client's
        # own work trails the server's answers less (4 such processes share one CPU).
        self.ep = select.epoll()
        self.by_fd: dict[int, Slot | None] = {}
        self.connect_queue: list[Slot] = []
        self.connecting = 0
        self.arm_outstanding = 0
        self.arm_sent = 0
        self.arm_failed = 0
        self.arm_reply_due = False
        self.results: list[tuple] = []
        self.collect: tuple[int, float] | None = None
        self.rearmed = 0
        self.errors: dict[str, int] = {}
        self.samples: dict[str, tuple[float, str]] = {}  # first answer of each error kind
        self.stopping = False

    # -- main loop -----------------------------------------------------------------------
    def run(self) -> None:
        self.ep.register(self.conn.fileno(), select.EPOLLIN)
        self.by_fd[self.conn.fileno()] = None
        monotonic = time.monotonic
        poll = self.ep.poll
        by_fd = self.by_fd
        while not self.stopping:
            busy = self.connect_queue or self.collect is not None
            ready = poll(0.02 if busy else 0.5)
            now = monotonic()  # the arrival stamp for everything in this batch
            for fd, _mask in ready:
                slot = by_fd.get(fd, False)
                if slot is False:
                    continue  # closed while this batch was being handled
                if slot is None:
                    while self.conn.poll():
                        self.command(self.conn.recv())
                elif slot.state == CONNECTING:
                    self.connected(slot)
                else:
                    self.readable(slot, now)
            self.start_connects()
            self.reply_if_due()

    def reply_if_due(self) -> None:
        if self.arm_reply_due and self.arm_outstanding == 0:
            self.arm_reply_due = False
            self.conn.send(("sent", self.arm_sent, self.arm_failed))
        if self.collect is not None:
            expected, deadline = self.collect
            if len(self.results) >= expected or time.monotonic() >= deadline:
                waiting = sum(1 for s in self.slots.values() if s.state == WAITING)
                results = [summarize(*r) for r in self.results]
                self.results = []
                self.collect = None
                self.conn.send(("collected", results, waiting))

    def command(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "arm":
            _, indices, since, timeout = cmd
            self.arm(indices, since, timeout)
        elif kind == "collect":
            _, expected, seconds = cmd
            self.collect = (expected, time.monotonic() + seconds)
        elif kind == "close":
            _, indices, rst = cmd
            n = 0
            if indices is None:  # everyone: also forget an arm still connecting (no "sent")
                self.connect_queue.clear()
                self.arm_reply_due = False
                self.arm_outstanding = 0
            for i in (self.slots if indices is None else indices):
                slot = self.slots[i]
                if slot.sock is not None:
                    self.drop(slot, rst=rst)
                    n += 1
            self.conn.send(("closed", n))
        elif kind == "counts":
            counts: dict[str, int] = {}
            for s in self.slots.values():
                name = ("new", "connecting", "waiting", "idle")[s.state]
                counts[name] = counts.get(name, 0) + 1
            counts["rearmed"] = self.rearmed
            counts.update({f"error:{k}": v for k, v in self.errors.items()})
            self.conn.send(("counts", counts, self.samples))
        elif kind == "stop":
            self.stopping = True
            for slot in self.slots.values():
                if slot.sock is not None:
                    self.drop(slot)
        else:
            raise ValueError(f"unknown command {kind!r}")

    # -- arming ---------------------------------------------------------------------------
    def arm(self, indices: list[int], since: int, timeout: float) -> None:
        self.arm_outstanding = 0
        self.arm_sent = self.arm_failed = 0
        self.arm_reply_due = True
        for i in indices:
            slot = self.slots[i]
            slot.request = (f"GET /events?since={since}&timeout={timeout:g} HTTP/1.1\r\n"
                            f"Host: bench\r\nAuthorization: Bearer {slot.token}\r\n\r\n"
                            ).encode("ascii")
            self.arm_outstanding += 1
            if slot.state == IDLE:
                self.send_request(slot)
            elif slot.state == NEW:
                self.connect_queue.append(slot)
            else:  # already waiting or connecting: nothing more to do
                self.arm_outstanding -= 1
        self.connect_queue.reverse()  # pop() from the end, in index order

    def start_connects(self) -> None:
        while self.connect_queue and self.connecting < MAX_CONNECTING:
            slot = self.connect_queue.pop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source_ip, 0))
                sock.setblocking(False)
                err = sock.connect_ex(self.address)
            except OSError as exc:
                sock.close()
                self.failed_arm(slot, f"socket:{exc.errno}")
                continue
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                self.failed_arm(slot, f"connect:{errno.errorcode.get(err, err)}")
                continue
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            slot.sock = sock
            slot.state = CONNECTING
            self.connecting += 1
            self.by_fd[sock.fileno()] = slot
            self.ep.register(sock.fileno(), select.EPOLLOUT)

    def connected(self, slot: Slot) -> None:
        self.connecting -= 1
        sock = slot.sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.ep.unregister(sock.fileno())
            del self.by_fd[sock.fileno()]
            sock.close()
            slot.sock = None
            slot.state = NEW
            self.failed_arm(slot, f"connect:{errno.errorcode.get(err, err)}")
            return
        self.ep.modify(sock.fileno(), select.EPOLLIN)
        self.send_request(slot)

    def send_request(self, slot: Slot) -> None:
        slot.buf.clear()
        slot.t_first = slot.t_kernel = 0.0
        slot.header_end = slot.content_length = -1
        try:
            sent = slot.sock.send(slot.request)  # type: ignore[union-attr]
        except OSError as exc:
            self.drop(slot)
            self.failed_arm(slot, f"send:{exc.errno}")
            return
        if sent != len(slot.request):  # a few hundred bytes always fit a fresh socket buffer
            self.drop(slot)
            self.failed_arm(slot, "short-send")
            return
        slot.state = WAITING
        self.arm_outstanding -= 1
        self.arm_sent += 1

    def count(self, what: str, sample: bytes | None = None) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        if sample is not None and what not in self.samples:
            self.samples[what] = (time.monotonic(), sample.decode("latin-1")[:400])

    def failed_arm(self, slot: Slot, why: str) -> None:
        self.count(why)
        self.arm_outstanding -= 1
        self.arm_failed += 1

    # -- answers ----------------------------------------------------------------------------
    def readable(self, slot: Slot, now: float) -> None:
        sock = slot.sock
        assert sock is not None
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(65536, TIMESTAMP_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data = b""
            self.errors[f"recv:{exc.errno}"] = self.errors.get(f"recv:{exc.errno}", 0) + 1
        if not data:
            if slot.state == WAITING:
                self.count("eof-while-waiting")
                self.results.append((slot.index, now, -1, b"", 0.0))
            self.drop(slot)
            return
        if slot.state != WAITING:
            self.errors["unexpected-bytes"] = self.errors.get("unexpected-bytes", 0) + 1
            return
        if not slot.buf:
            slot.t_first = now
            if ancillary:  # the kernel's stamp of the last segment this recvmsg returned
                sec, ns = _timespec(ancillary[0][2])
                slot.t_kernel = sec + ns * 1e-9
        buf = slot.buf
        buf += data
        if slot.header_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            slot.header_end = end + 4
            slot.content_length = content_length(bytes(buf[:slot.header_end]))
        if len(buf) < slot.header_end + slot.content_length:
            return
        self.complete(slot)

    def complete(self, slot: Slot) -> None:
        buf = slot.buf
        status = int(buf[9:12])
        if status != 200:
            self.count(f"status-{status}", bytes(buf[:slot.header_end + slot.content_length]))
        body = bytes(buf[slot.header_end:slot.header_end + slot.content_length])
        head = bytes(buf[:slot.header_end]).lower()
        slot.state = IDLE
        if b"\r\nconnection: close" in head:
            self.drop(slot)
        if status == 200 and b'"events":[]' in body:
            # The long-poll timed out (or the hub asked for a re-read): wait again from there.
            self.rearmed += 1
            if slot.sock is not None:
                cursor = json.loads(body)["cursor"]
                slot.request = slot.request.replace(
                    slot.request[slot.request.index(b"since="):slot.request.index(b"&")],
                    f"since={cursor}".encode())
                self.arm_outstanding += 1
                self.send_request(slot)
            return
        # Parsed only when the coordinator collects: less work while answers arrive.
        self.results.append((slot.index, slot.t_first, status, body, slot.t_kernel))

    def drop(self, slot: Slot, rst: bool = False) -> None:
        sock = slot.sock
        if sock is None:
            return
        if slot.state == CONNECTING:
            self.connecting -= 1
        fd = sock.fileno()
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.ep.unregister(fd)
        self.by_fd.pop(fd, None)
        if rst:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        slot.sock = None
        slot.state = NEW


def summarize(index: int, t_first: float, status: int, body: bytes, t_kernel: float) -> tuple:
    """(client, first-byte time, status, cursor, number of events, id of the message in the
    first event or None, the kernel's receive time) for one answer."""
    cursor, n_events, message_id = -1, 0, None
    if status == 200:
        doc = json.loads(body)
        cursor = doc["cursor"]
        n_events = len(doc["events"])
        first = doc["events"][0] if doc["events"] else {}
        if first.get("type") == "message.created":
            message_id = first["data"]["id"]
    return index, t_first, status, cursor, n_events, message_id, t_kernel


def content_length(head: bytes) -> int:
    """The Content-Length of a response head (0 when absent)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def worker_main(conn: Connection, host: str, port: int, source_ip: str,
                tokens: dict[int, str], cpus: set[int] | None) -> None:
    raise_nofile_limit()
    if cpus:
        os.sched_setaffinity(0, cpus)
    with contextlib.suppress(KeyboardInterrupt):
        ClientWorker(conn, host, port, source_ip, tokens).run()


class LoadClient:
    """The coordinator's handle on the client processes. Client i lives in process i % P."""

    def __init__(self, processes: int, host: str, port: int, tokens: list[str],
                 cpus: set[int] | None = None) -> None:
        ctx = mp.get_context("fork")
        self.n = processes
        self.samples: dict[str, tuple[float, str]] = {}  # first error answer of each kind
        self.pipes: list[Connection] = []
        self.procs = []
        self.arm_pending: set[int] = set()  # processes whose "sent" for an arm is still due
        for w in range(processes):
            mine = {i: t for i, t in enumerate(tokens) if i % processes == w}
            parent, child = ctx.Pipe()
            # Each process its own source address: 10,000s of connects never run out of ports.
            p = ctx.Process(target=worker_main, name=f"rt-client-{w}", daemon=True,
                            args=(child, host, port, f"127.0.0.{10 + w}", mine, cpus))
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def _split(self, indices: list[int]) -> list[list[int]]:
        parts: list[list[int]] = [[] for _ in range(self.n)]
        for i in indices:
            parts[i % self.n].append(i)
        return parts

    def _gather(self, kind: str, timeout: float) -> list[tuple]:
        replies: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < self.n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"client processes did not answer {kind!r} in {timeout} s")
            for pipe in wait([p for i, p in enumerate(self.pipes) if i not in replies], left):
                msg = pipe.recv()
                i = self.pipes.index(pipe)
                if msg[0] == "sent" and i in self.arm_pending:
                    self.arm_pending.discard(i)
                    if kind != "sent":  # the late answer to an arm_async(): not this one
                        continue
                if msg[0] != kind:
                    raise RuntimeError(f"expected {kind!r} from a client process, got {msg[0]!r}")
                replies[i] = msg
        return [replies[i] for i in range(self.n)]

    def arm(self, indices: list[int], since: int, timeout: float = 60.0,
            wait_seconds: float = 300.0) -> tuple[int, int]:
        self.arm_async(indices, since, timeout)
        replies = self._gather("sent", wait_seconds)
        return sum(r[1] for r in replies), sum(r[2] for r in replies)

    def arm_async(self, indices: list[int], since: int, timeout: float = 60.0) -> None:
        """Like arm() without waiting until every request is written (a server that stops
        accepting would keep it waiting): the "sent" answers are skipped when they come."""
        for pipe, part in zip(self.pipes, self._split(indices), strict=True):
            pipe.send(("arm", part, since, timeout))
        self.arm_pending = set(range(self.n))

    def collect_round(self, expected_by_proc: list[int], seconds: float
                      ) -> tuple[list[tuple], int]:
        for pipe, expected in zip(self.pipes, expected_by_proc, strict=True):
            pipe.send(("collect", expected, seconds))
        replies = self._gather("collected", seconds + 30)
        results = [r for reply in replies for r in reply[1]]
        return results, sum(reply[2] for reply in replies)

    def sched_ns(self) -> tuple[int, int]:
        """(on-CPU ns, waiting-for-a-CPU ns) of all client processes together."""
        run = wait = 0
        for p in self.procs:
            r, w = read_sched_ns(p.pid)
            run += r
            wait += w
        return run, wait

    def expected_by_proc(self, indices: list[int]) -> list[int]:
        return [len(part) for part in self._split(indices)]

    def close(self, indices: list[int] | None = None, rst: bool = False) -> int:
        parts = self._split(indices) if indices is not None else [None] * self.n
        for pipe, part in zip(self.pipes, parts, strict=True):
            pipe.send(("close", part, rst))
        closed = sum(r[1] for r in self._gather("closed", 60))
        if indices is None:  # a full close cancels any arm still due
            self.arm_pending.clear()
        return closed

    def counts(self) -> dict[str, int]:
        """Clients per state, re-arms after empty answers, and errors, over all processes."""
        for pipe in self.pipes:
            pipe.send(("counts",))
        total: dict[str, int] = {}
        self.samples = {}
        for reply in self._gather("counts", 30):
            for k, v in reply[1].items():
                total[k] = total.get(k, 0) + v
            for k, v in reply[2].items():
                if k not in self.samples or v[0] < self.samples[k][0]:
                    self.samples[k] = v
        return total

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()


# ============================================================================================
# The coordinator
# ============================================================================================

class ClientsLost(RuntimeError):
    """Some clients were answered or disconnected while they should be waiting."""


@dataclass
class Report:
    params: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.report = Report(params={k: v for k, v in vars(args).items() if k != "json"})
        self.recoveries: list[str] = []  # long-polls lost (503) and sent again
        self.slowest_stats = 0.0  # the longest GET /stats took (it is answered on the loop)
        self.stale_answers = 0

    # -- node helpers -----------------------------------------------------------------------
    def stats(self) -> dict:
        t0 = time.monotonic()
        reply = self.admin.request("GET", "/stats", token=ADMIN_TOKEN)
        self.slowest_stats = max(self.slowest_stats, time.monotonic() - t0)
        if reply.status != 200:
            raise RuntimeError(f"GET /stats answered {reply.status}: {reply.body[:200]!r}")
        return reply.json()

    def wait_stats(self, what: str, predicate, timeout: float) -> tuple[dict, float]:
        """Poll /stats until `predicate(stats)`; returns (stats, seconds waited)."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            st = self.stats()
            if predicate(st):
                return st, time.monotonic() - started
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached in {timeout} s; last stats: "
                                   f"hub={st['hub']} http={st['http']} "
                                   f"clients={self.clients.counts()}")
            time.sleep(0.05)

    def wait_waiters(self, n: int, what: str, timeout: float = 300) -> tuple[dict, float]:
        """Until hub.waiters >= n; fails early when clients were answered with an error or
        lost their connection (they would never be counted)."""
        started = time.monotonic()
        deadline = started + timeout
        next_check = started + 1.0
        while True:
            st = self.stats()
            if self.waiters(st) >= n:
                return st, time.monotonic() - started
            now = time.monotonic()
            if now > next_check:
                next_check = now + 1.0
                c = self.clients.counts()
                if c.get("waiting", 0) + c.get("connecting", 0) < n and now > started + 3:
                    raise ClientsLost(
                        f"{what}: clients lost their long-poll: {c}; hub {st['hub']['waiters']}"
                        f" waiters; first error answers: {self.clients.samples}")
            if now > deadline:
                raise TimeoutError(f"{what}: not reached in {timeout} s; last stats: "
                                   f"hub={st['hub']} http={st['http']} "
                                   f"clients={self.clients.counts()}")
            time.sleep(0.05)

    def waiters(self, st: dict) -> int:
        return st["hub"]["waiters"]

    def park(self, indices: list[int], what: str, timeout: float = 300) -> dict:
        """Send the clients' long-polls and wait until the hub counts them all. Clients that
        were answered meanwhile (503 when the node stopped being active) are sent again once
        the node is active again; each such recovery is recorded."""
        for _attempt in range(5):
            since = self.cursor()
            _sent, failed = self.clients.arm(indices, since)
            if failed:
                raise RuntimeError(f"{what}: {failed} clients could not send their long-poll"
                                   f" ({self.clients.counts()})")
            try:
                st, _ = self.wait_waiters(len(indices), what, timeout)
                return st
            except ClientsLost as exc:
                self.recoveries.append(f"{what}: {str(exc)[:400]}")
                log(f"    clients lost their long-poll ({str(exc)[:160]}...); waiting for the "
                    f"node to be active again, then sending them again")
                self.node.wait_health(timeout=60, active=True)
                time.sleep(0.5)
        raise RuntimeError(f"{what}: gave up after 5 attempts")

    def rss(self) -> int:
        return read_rss_bytes(self.node.pid)

    def cursor(self) -> int:
        """The stream's current position (GET /events without a cursor), once active."""
        deadline = time.monotonic() + 60
        while True:
            reply = self.poster.request("GET", "/events", token=self.seeded.poster_token)
            if reply.status == 200:
                return reply.json()["cursor"]
            if time.monotonic() > deadline:
                raise RuntimeError(f"GET /events answered {reply.status}: {reply.body[:200]!r}")
            time.sleep(0.2)

    def settle(self, seconds: float = 1.0) -> None:
        time.sleep(seconds)

    # -- phases ---------------------------------------------------------------------------
    def phase_hold(self, n: int) -> None:
        """(a) n clients parked at once; RSS while they wait."""
        log(f"(a) parking {n} long-polls ...")
        rss_idle = self.rss()
        started = time.monotonic()
        self.park(list(range(n)), "all clients waiting")
        park_seconds = time.monotonic() - started
        self.settle(1.0)
        st = self.stats()
        held = self.waiters(st)
        rss = self.rss()
        log(f"    slowest GET /stats while they connected: {self.slowest_stats:.2f} s")
        log(f"    {held} waiting after {park_seconds:.1f} s ({n / park_seconds:.0f}/s); "
            f"RSS {rss / MiB:.0f} MiB (idle {rss_idle / MiB:.0f} MiB); "
            f"connections {st['http']['connections']}, parked {st['http']['parked']}")
        self.report.figures["hold"] = {
            "clients": n, "hub_waiters": held,
            "http_parked": st["http"]["parked"], "connections": st["http"]["connections"],
            "park_seconds": round(park_seconds, 2), "rss_bytes": rss, "rss_idle_bytes": rss_idle,
            "slowest_stats_s": round(self.slowest_stats, 3),
            "rss_per_waiter_bytes": round((rss - rss_idle) / max(1, held)),
        }
        ok_held = held == n
        self.report.rows.append((f"(a) waiting clients held (hub.waiters, of {n})", held,
                                 f"= {n}", verdict(ok_held)))
        self.report.rows.append(("    time to park them all / slowest GET /stats",
                                 f"{park_seconds:.1f} s ({n / park_seconds:.0f}/s) / "
                                 f"{self.slowest_stats:.2f} s", "(info)", ""))
        self.report.rows.append((f"(a) server RSS with {held} waiting",
                                 f"{rss / MiB:.0f} MiB", "< 1024 MiB",
                                 verdict(rss < TARGETS["rss"])))
        if not ok_held:
            self.report.failures.append("hold")
        # Everyone hangs up at once: the hub must drop them all.
        self.clients.close()
        _, seconds = self.wait_stats("mass disconnect cleaned up",
                                     lambda s: self.waiters(s) == 0
                                     and s["http"]["connections"] <= self.baseline_conns, 60)
        log(f"    all {n} disconnected: waiters 0, connections back to baseline in "
            f"{seconds:.2f} s")

    def phase_delivery(self, label: str, group: int, members: int, rounds: int,
                       target_ms: float) -> None:
        """(b)/(c) one message to a group whose `members` members are all waiting."""
        log(f"({label}) delivery to {members} waiting members, {rounds} rounds ...")
        indices = list(range(members))
        expected = self.clients.expected_by_proc(indices)
        per_round = []
        for r in range(-1, rounds):  # round -1: a warm-up, not counted
            self.park(indices, f"{members} waiting")
            self.settle(0.5)
            stale, _ = self.clients.collect_round([0] * self.clients.n, 0)
            if stale:  # answers that came before the POST (e.g. 503 during a demotion)
                self.stale_answers += len(stale)
            self.poster.connect()
            sched0 = read_sched_ns(self.node.pid)
            clients0 = self.clients.sched_ns()
            t0 = time.monotonic()
            t0_real = time.time()  # the same instant on the clock of the kernel's stamps
            reply = self.poster.request("POST", "/messages",
                                        {"groupId": group, "content": f"round {r} to {members}"},
                                        token=self.seeded.poster_token)
            t_ack = time.monotonic()
            if reply.status != 201:
                raise RuntimeError(f"POST /messages answered {reply.status}: {reply.body!r}")
            message_id = reply.json()["id"]
            results, still_waiting = self.clients.collect_round(expected, 30)
            sched1 = read_sched_ns(self.node.pid)
            clients1 = self.clients.sched_ns()
            ok = [r for r in results if r[2] == 200 and r[4] >= 1 and r[5] == message_id]
            good = [r[1] - t0 for r in ok]
            bad = len(results) - len(good)
            summary = latency_summary(good)
            # The same deliveries by the kernel's receive time: free of the load client's own
            # delays (4 processes on one CPU reading 5,000 answers), so closer to the node's.
            kernel = latency_summary(r[6] - t0_real for r in ok if r[6] > 0)
            summary.update({f"kernel_{k}": v for k, v in kernel.items()})
            summary.update({
                "delivered": len(good), "bad": bad, "missing": members - len(good),
                "post_ack_ms": round((t_ack - t0) * 1000, 2),
                "server_cpu_ms": round((sched1[0] - sched0[0]) / 1e6, 1),
                "server_runqueue_wait_ms": round((sched1[1] - sched0[1]) / 1e6, 1),
                "clients_cpu_ms": round((clients1[0] - clients0[0]) / 1e6, 1),
                "clients_runqueue_wait_ms": round((clients1[1] - clients0[1]) / 1e6, 1)})
            if r >= 0:
                per_round.append(summary)
            log(f"    {'warm-up' if r < 0 else f'round {r + 1}'}: delivered {len(good)}/{members}"
                f"{f', bad {bad}' if bad else ''}"
                f"{f', still waiting {still_waiting}' if still_waiting else ''}; "
                f"p50 {summary['p50']:.1f} ms, p99 {summary['p99']:.1f} ms, "
                f"max {summary['max']:.1f} ms (kernel's receive time: p50 "
                f"{summary['kernel_p50']:.1f}, p99 {summary['kernel_p99']:.1f} ms); "
                f"POST acked after {summary['post_ack_ms']:.1f} ms; "
                f"server CPU {summary['server_cpu_ms']:.0f} ms, waited for a CPU "
                f"{summary['server_runqueue_wait_ms']:.0f} ms; clients CPU "
                f"{summary['clients_cpu_ms']:.0f} ms")
        p99s = [s["p99"] for s in per_round]
        median_p99 = statistics.median(p99s)
        all_delivered = all(s["delivered"] == members and s["bad"] == 0 for s in per_round)
        self.report.figures[f"delivery_{members}"] = {
            "members": members, "rounds": per_round, "median_p99_ms": median_p99}
        self.report.rows.append((f"({label}) {members} members: p99 ms (median of {rounds})",
                                 f"{median_p99:.1f}", f"<= {target_ms:g}",
                                 verdict(median_p99 <= target_ms and all_delivered)))
        self.report.rows.append(("    p50 / p99 / max ms, each round",
                                 " ".join(f"{s['p50']:.0f}/{s['p99']:.0f}/{s['max']:.0f}"
                                          for s in per_round), "", ""))
        acked = statistics.median(s["post_ack_ms"] for s in per_round)
        kernel_p99 = statistics.median(s["kernel_p99"] for s in per_round)
        self.report.figures[f"delivery_{members}"]["median_kernel_p99_ms"] = kernel_p99
        self.report.rows.append(("    by the kernel's receive time: p99 (median)",
                                 f"{kernel_p99:.1f}", "(info)", ""))
        self.report.rows.append(("    ... p50 / p99 / max ms, each round",
                                 " ".join(f"{s['kernel_p50']:.0f}/{s['kernel_p99']:.0f}/"
                                          f"{s['kernel_max']:.0f}" for s in per_round), "", ""))
        self.report.rows.append(("    POST answered after, median",
                                 f"{acked:.0f} ms", "(info)", ""))
        cpu = statistics.median(s["server_cpu_ms"] for s in per_round)
        runq = statistics.median(s["server_runqueue_wait_ms"] for s in per_round)
        self.report.rows.append(("    server on CPU / waiting for a CPU (median)",
                                 f"{cpu:.0f} ms / {runq:.0f} ms", "(info)", ""))
        if not all_delivered:
            self.report.rows.append(("    missing or wrong answers", sum(
                s["missing"] + s["bad"] for s in per_round), "0", "FAIL"))

    def phase_cycles(self, total: int, batch: int, n_clients: int) -> None:
        """(d) connect, park, disconnect before any event; `batch` clients at a time
        (alternately closing with FIN and with RST)."""
        log(f"(d) {total} connect-wait-disconnect cycles, {batch} at a time ...")
        self.clients.close()
        self.wait_stats("idle before cycles", lambda s: self.waiters(s) == 0
                        and s["http"]["connections"] <= self.baseline_conns, 60)
        self.settle(1.0)
        rss_before = self.rss()
        rss_marks = []
        done = 0
        start = 0
        started = time.monotonic()
        n_batch = 0
        while done < total:
            size = min(batch, total - done)
            indices = [(start + k) % n_clients for k in range(size)]
            start = (start + size) % n_clients
            self.park(indices, "cycle batch waiting", 120)
            self.clients.close(indices, rst=n_batch % 2 == 1)
            self.wait_stats("batch gone", lambda s: self.waiters(s) == 0, 60)
            done += size
            n_batch += 1
            rss_marks.append((done, self.rss()))
        seconds = time.monotonic() - started
        st, _ = self.wait_stats("connections back to baseline",
                                lambda s: s["http"]["connections"] <= self.baseline_conns, 60)
        self.settle(1.0)
        st = self.stats()
        rss_after = self.rss()
        growth = rss_after - rss_before
        waiters = self.waiters(st)
        conns = st["http"]["connections"]
        log(f"    {done} cycles in {seconds:.1f} s; waiters {waiters}, connections {conns} "
            f"(baseline {self.baseline_conns}), parked {st['http']['parked']}, "
            f"hub users {st['hub']['users']}, groups {st['hub']['groups']}; RSS "
            f"{rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB; after each batch: "
            + " ".join(f"{r / MiB:.1f}" for _, r in rss_marks))
        self.report.figures["cycles"] = {
            "cycles": done, "seconds": round(seconds, 2), "waiters_after": waiters,
            "connections_after": conns, "baseline_connections": self.baseline_conns,
            "hub_after": st["hub"], "http_after": st["http"],
            "rss_before_bytes": rss_before, "rss_after_bytes": rss_after,
            "rss_marks": rss_marks,
        }
        self.report.rows.append((f"(d) waiters after {done} cycles", waiters, "0",
                                 verdict(waiters == 0 and st["hub"]["users"] == 0
                                         and st["hub"]["groups"] == 0)))
        self.report.rows.append(("(d) open connections after cycles",
                                 f"{conns} (baseline {self.baseline_conns})", "baseline",
                                 verdict(conns == self.baseline_conns
                                         and st["http"]["parked"] == 0)))
        self.report.rows.append(("(d) server RSS before -> after cycles",
                                 f"{rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB "
                                 f"({growth / MiB:+.1f})",
                                 f"growth <= {RSS_GROWTH_TOLERANCE / MiB:.0f} MiB",
                                 verdict(growth <= RSS_GROWTH_TOLERANCE)))

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> Report:
        a = self.args
        workdir = Path(tempfile.mkdtemp(prefix="hachat-rt-bench-"))
        url = f"sqlite:///{workdir / 'bench.db'}"
        raise_nofile_limit()
        log(f"seeding {a.clients} users + groups of {a.small} and {a.big} into {url} ...")
        self.seeded = seed_database(url, a.clients, a.small, a.big)
        log(f"    seeded in {self.seeded.seconds:.1f} s")
        self.node = NodeProc("rt-node", {"DATABASE_URL": url, "IS_ACTIVE": "true",
                                         "ADMIN_TOKEN": ADMIN_TOKEN, "LOG_LEVEL": "INFO"},
                             workdir)
        server_cpus, client_cpus = pinning_plan() if a.pin else (None, None)
        self.node.cpus = server_cpus
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)  # the coordinator runs with the clients
        log(f"CPUs: server {sorted(server_cpus) if server_cpus else 'any'}, clients "
            f"{sorted(client_cpus) if client_cpus else 'any'}")
        self.report.figures["cpus"] = {"server": server_cpus, "clients": client_cpus}
        self.clients: LoadClient | None = None
        try:
            self.node.start()
            self.node.wait_health(timeout=60, active=True)
            log(f"node pid {self.node.pid} at {self.node.url} (log {self.node.log_path})")
            # Generous timeouts: a slow answer is a figure to report, not a reason to stop.
            self.admin = KeepAliveHTTP(self.node.url, timeout=120)
            self.poster = KeepAliveHTTP(self.node.url, timeout=120)
            self.cursor()  # opens the poster's connection
            self.clients = LoadClient(a.processes, "127.0.0.1", self.node.port,
                                      self.seeded.tokens, client_cpus)
            self.baseline_conns = self.stats()["http"]["connections"]
            self.report.figures["baseline_connections"] = self.baseline_conns
            self.report.figures["rss_start_bytes"] = self.rss()
            phases = {
                "a": lambda: self.phase_hold(a.clients),
                "b": lambda: self.phase_delivery("b", self.seeded.groups["small"], a.small,
                                                 a.rounds, TARGETS["p99_small"]),
                "c": lambda: self.phase_delivery("c", self.seeded.groups["big"], a.big,
                                                 a.rounds, TARGETS["p99_big"]),
                "d": lambda: self.phase_cycles(a.cycles, min(a.cycle_batch, a.clients),
                                               a.clients),
            }
            for name in a.phases:
                try:
                    phases[name]()
                except (TimeoutError, RuntimeError) as exc:
                    log(f"    phase ({name}) failed: {exc}")
                    self.report.rows.append((f"({name}) did not complete",
                                             str(exc).splitlines()[0][:60], "", "FAIL"))
                    self.report.figures[f"error_{name}"] = str(exc)
                    self.clients.close()
                    time.sleep(2)
            self.report.figures["client_counts"] = self.clients.counts()
            self.report.figures["rss_end_bytes"] = self.rss()
            self.report.figures["recoveries"] = self.recoveries
            self.report.figures["stale_answers"] = self.stale_answers
            changes = role_changes(self.node.log_path)
            self.report.figures["role_changes"] = changes
            self.report.rows.append(("node stayed active (role changes after start)",
                                     len(changes), "0", verdict(not changes)))
            if self.recoveries:
                self.report.rows.append(("    long-polls answered 503 and sent again",
                                         f"{len(self.recoveries)} times", "(info)", ""))
            for line in changes[:6]:
                log(f"    role change: {line}")
        finally:
            if self.clients is not None:
                self.clients.stop()
            self.node.stop()
            if a.keep:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        return self.report


# ============================================================================================
# Peer baselines: the same load client against small long-polling servers from bench/peers/
# ============================================================================================

PEERS_DIR = BENCH_DIR / "peers"
PEERS = ("aiohttp", "uvicorn", "waitress")
PEER_LABELS = {"aiohttp": "aiohttp", "uvicorn": "uvicorn+starlette (httptools, uvloop)",
               "waitress": "waitress (4 threads)"}
# The peers' group ids (their tokens list them; see bench/peers/broadcast.py).
PEER_GROUPS = {"small": 1, "big": 2, "lobby": 3}


def peer_tokens(clients: int, small: int, big: int) -> list[str]:
    """Client i's token for a peer: its groups as hachat's seeding makes them (g-small for
    i < small, g-big for i < big, lobby for all)."""
    tokens = []
    for i in range(clients):
        groups = [g for g, member in ((PEER_GROUPS["small"], i < small),
                                      (PEER_GROUPS["big"], i < big),
                                      (PEER_GROUPS["lobby"], True)) if member]
        tokens.append(",".join(map(str, groups)))
    return tokens


class PeerServer:
    """One peer process pinned like the node, with its GET /stats (on a side port for waitress,
    whose request threads are all taken by waiters)."""

    def __init__(self, name: str, workdir: Path, cpus: set[int] | None, serial: int) -> None:
        self.name = name
        self.port = free_port()
        stats_port = self.port
        py = sys.executable
        if name == "aiohttp":
            argv = [py, str(PEERS_DIR / "aiohttp_broadcast.py"), str(self.port)]
        elif name == "uvicorn":
            argv = [py, "-m", "uvicorn", "--app-dir", str(PEERS_DIR), "starlette_broadcast:app",
                    "--host", "127.0.0.1", "--port", str(self.port), "--http", "httptools",
                    "--loop", "uvloop", "--workers", "1", "--log-level", "warning",
                    "--no-access-log"]
        elif name == "waitress":
            stats_port = free_port()
            argv = [py, str(PEERS_DIR / "waitress_broadcast.py"), str(self.port),
                    str(stats_port)]
        else:
            raise ValueError(f"unknown peer {name!r}")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = ManagedProcess(name, argv, cwd=workdir, cpus=cpus,
                                   log_path=workdir / f"peer-{name}-{serial}.log")
        self.stats_http = KeepAliveHTTP(f"http://127.0.0.1:{stats_port}", timeout=30)
        try:
            wait_until_serving(stats_port, "/stats", timeout=30, process=self.proc)
        except BaseException:
            self.proc.stop(timeout=2)
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict:
        reply = self.stats_http.request("GET", "/stats")
        if reply.status != 200:
            raise RuntimeError(f"{self.name} GET /stats answered {reply.status}")
        return reply.json()

    def stop(self) -> None:
        self.stats_http.close()
        # No graceful shutdown: waiters of closed connections may linger until their timeout.
        self.proc.stop(timeout=2)


class PeerBench:
    """Phases (a), (b) and (c) against each peer, a fresh peer process per phase (a framework
    may keep the waiters of closed connections until their timeout; waitress keeps its threads
    blocked). Every wait is bounded: a peer that cannot hold or answer everyone is reported
    with what it did ("held k of N", "answered k of N"), never waited on for ever."""

    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        self.args = args
        self.report = report
        self.bound = args.peer_wait
        self.tokens = peer_tokens(args.clients, args.small, args.big)
        self.figures: dict[str, dict[str, Any]] = {}
        report.figures["peers"] = self.figures
        self.serial = 0

    # -- one peer process and its clients for one phase ------------------------------------
    @contextlib.contextmanager
    def peer(self, name: str):
        self.serial += 1
        server = PeerServer(name, self.workdir, self.server_cpus, self.serial)
        clients = None
        try:
            clients = LoadClient(self.args.processes, "127.0.0.1", server.port, self.tokens,
                                 self.client_cpus)
            yield server, clients
        finally:
            if clients is not None:
                with contextlib.suppress(Exception):
                    clients.close()
                clients.stop()
            server.stop()

    def park(self, server: PeerServer, clients: LoadClient, n: int) -> tuple[int, float, dict]:
        """Send n long-polls; wait until the peer counts n waiters, or until their number has
        not grown for `bound` seconds. (waiters held, seconds, last stats)."""
        st = server.stats()
        clients.arm_async(list(range(n)), st["cursor"])
        started = last_growth = time.monotonic()
        best = -1
        while True:
            st = server.stats()
            now = time.monotonic()
            if st["waiters"] >= n:
                return st["waiters"], now - started, st
            if st["waiters"] > best:
                best, last_growth = st["waiters"], now
            elif now - last_growth > self.bound:
                return st["waiters"], last_growth - started, st
            time.sleep(0.05)

    # -- phases ---------------------------------------------------------------------------
    def phase_hold(self, name: str, n: int) -> None:
        log(f"[{name}] (a) parking {n} long-polls ...")
        with self.peer(name) as (server, clients):
            rss_idle = read_rss_bytes(server.pid)
            held, seconds, st = self.park(server, clients, n)
            time.sleep(1.0)
            st = server.stats()
            rss = read_rss_bytes(server.pid)
            counts = clients.counts()
            extra = {k: st[k] for k in ("connections", "queued") if k in st}
            rate = f" ({n / seconds:.0f}/s)" if held >= n and seconds > 0 else ""
            log(f"    {st['waiters']} of {n} waiting after {seconds:.1f} s{rate}; RSS "
                f"{rss / MiB:.0f} MiB (idle {rss_idle / MiB:.0f} MiB)"
                f"{f'; {extra}' if extra else ''}; clients {counts}")
            self.figures[name]["hold"] = {
                "clients": n, "waiters": st["waiters"], "park_seconds": round(seconds, 2),
                "rss_bytes": rss, "rss_idle_bytes": rss_idle, "peer_stats": st,
                "client_counts": counts}

    def phase_delivery(self, name: str, group: int, members: int) -> None:
        rounds = self.args.rounds
        log(f"[{name}] delivery to {members} waiting members, {rounds} rounds ...")
        indices = list(range(members))
        per_round: list[dict[str, Any]] = []
        incomplete: dict[str, Any] | None = None
        with self.peer(name) as (server, clients):
            expected = clients.expected_by_proc(indices)
            poster = KeepAliveHTTP(server.url, timeout=self.bound)
            try:
                for r in range(-1, rounds):
                    held, _, st = self.park(server, clients, members)
                    time.sleep(0.5)
                    stale, _ = clients.collect_round([0] * clients.n, 0)
                    cursor = server.stats()["cursor"]
                    poster.close()  # a fresh connection: some peers drop idle ones in 5 s
                    post_failed = "POST not answered"
                    try:  # outside the timing, like hachat's open keep-alive connection
                        poster.connect()
                        connected = True
                    except OSError:  # e.g. a full accept queue: the SYN is dropped
                        post_failed = "the poster could not connect"
                        connected = False
                    t0 = time.monotonic()
                    t0_real = time.time()
                    message_id = cursor + 1  # a peer numbers messages and events alike
                    try:
                        if not connected:
                            raise ConnectionRefusedError(post_failed)
                        reply = poster.request(
                            "POST", "/messages",
                            {"groupId": group, "content": f"round {r} to {members}"},
                            token=str(group))
                        t_ack: float | None = time.monotonic()
                        if reply.status != 201:
                            raise RuntimeError(f"{name} POST /messages answered "
                                               f"{reply.status}: {reply.body[:200]!r}")
                        message_id = reply.json()["id"]
                    except (OSError, http.client.HTTPException):
                        t_ack = None
                        poster.close()
                    results, still_waiting = clients.collect_round(expected, self.bound)
                    ok = [x for x in results if x[2] == 200 and x[4] >= 1 and x[5] == message_id]
                    summary = latency_summary(x[1] - t0 for x in ok)
                    kernel = latency_summary(x[6] - t0_real for x in ok if x[6] > 0)
                    summary.update({f"kernel_{k}": v for k, v in kernel.items()})
                    summary.update({
                        "held": held, "delivered": len(ok), "bad": len(results) - len(ok),
                        "stale": len(stale),
                        "post_ack_ms": None if t_ack is None else round((t_ack - t0) * 1000, 2),
                        "post_failed": None if t_ack is not None else post_failed})
                    ack = (f"{post_failed} in {self.bound:g} s" if t_ack is None
                           else f"POST acked after {summary['post_ack_ms']:.1f} ms")
                    lat = (f"p50 {summary['p50']:.1f} ms, p99 {summary['p99']:.1f} ms, max "
                           f"{summary['max']:.1f} ms" if ok else "no latencies")
                    log(f"    {'warm-up' if r < 0 else f'round {r + 1}'}: held {held}, "
                        f"answered {len(ok)} of {members}"
                        f"{f', bad {len(results) - len(ok)}' if len(results) > len(ok) else ''}"
                        f"{f', still waiting {still_waiting}' if still_waiting else ''}; "
                        f"{lat}; {ack}"
                        f"{f'; peer {st}' if held < members else ''}")
                    if len(ok) < members:
                        incomplete = {"round": r + 1, **summary, "peer_stats": st}
                        break  # its waiters are stuck or gone: further rounds say no more
                    if r >= 0:
                        per_round.append(summary)
            finally:
                poster.close()
        fig: dict[str, Any] = {"members": members, "rounds": per_round, "incomplete": incomplete}
        if per_round and incomplete is None:
            for k in ("p50", "p99", "max", "kernel_p99"):
                fig[f"median_{k}_ms"] = statistics.median(s[k] for s in per_round)
        self.figures[name][f"delivery_{members}"] = fig

    def run(self) -> None:
        a = self.args
        self.workdir = Path(tempfile.mkdtemp(prefix="hachat-rt-peers-"))
        raise_nofile_limit()
        self.server_cpus, self.client_cpus = pinning_plan() if a.pin else (None, None)
        if self.client_cpus:
            os.sched_setaffinity(0, self.client_cpus)
        try:
            for name in a.peers:
                self.figures[name] = {}
                phases = {
                    "a": lambda n=name: self.phase_hold(n, a.clients),
                    "b": lambda n=name: self.phase_delivery(n, PEER_GROUPS["small"], a.small),
                    "c": lambda n=name: self.phase_delivery(n, PEER_GROUPS["big"], a.big),
                }
                for phase in a.phases:
                    if phase not in phases:
                        continue  # (d) is hachat's own clean-up check
                    try:
                        phases[phase]()
                    except (TimeoutError, RuntimeError, OSError) as exc:
                        log(f"    [{name}] phase ({phase}) failed: {exc}")
                        self.figures[name][f"error_{phase}"] = str(exc)
        finally:
            if a.keep:
                log(f"kept {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


def peer_table(args: argparse.Namespace, report: Report) -> str:
    """hachat and each peer side by side: (a) held and RSS, (b)/(c) the medians over the
    rounds of p50 / p99 / max, and the p99 ratio hachat / peer."""
    figs = report.figures

    def delivery(fig: dict | None, members: int) -> tuple[str, float | None]:
        if not fig:
            return "-", None
        inc = fig.get("incomplete")
        if inc is not None:
            post = ("POST answered" if inc["post_ack_ms"] is not None
                    else "poster could not connect" if "connect" in (inc.get("post_failed") or "")
                    else "POST unanswered")
            return f"answered {inc['delivered']} of {members}; held {inc['held']}, {post}", None
        rounds = fig["rounds"]
        if not rounds:
            return "-", None
        p50, p99, mx = (statistics.median(s[k] for s in rounds) for k in ("p50", "p99", "max"))
        return f"{p50:.1f} / {p99:.1f} / {mx:.1f}", p99

    def ratio(ours: float | None, theirs: float | None) -> str:
        if ours is None or theirs is None or theirs <= 0:
            return "-"
        return f"{ours / theirs:.2f}"

    hold = figs.get("hold")
    hachat = {
        "held": f"{hold['hub_waiters']} of {hold['clients']}" if hold else "-",
        "rss": hold["rss_bytes"] if hold else None,
        "b": delivery(figs.get(f"delivery_{args.small}"), args.small),
        "c": delivery(figs.get(f"delivery_{args.big}"), args.big),
    }
    rows = [("hachat", hachat["held"],
             f"{hachat['rss'] / MiB:.0f} MiB" if hachat["rss"] else "-",
             hachat["b"][0], "1.00" if hachat["b"][1] else "-",
             hachat["c"][0], "1.00" if hachat["c"][1] else "-")]
    for name, fig in figs.get("peers", {}).items():
        h = fig.get("hold")
        b = delivery(fig.get(f"delivery_{args.small}"), args.small)
        c = delivery(fig.get(f"delivery_{args.big}"), args.big)
        queued = h["peer_stats"].get("queued") if h else None
        rows.append((PEER_LABELS[name],
                     (f"{h['waiters']} of {h['clients']}"
                      + (f"; {queued} queued" if queued else "")) if h else "-",
                     f"{h['rss_bytes'] / MiB:.0f} MiB" if h else "-",
                     b[0], ratio(hachat["b"][1], b[1]), c[0], ratio(hachat["c"][1], c[1])))
    head = ("server", "(a) held", "RSS held",
            f"(b) {args.small} members p50/p99/max ms", "p99 hachat/peer",
            f"(c) {args.big} members p50/p99/max ms", "p99 hachat/peer")
    return format_table(head, rows)


def role_changes(log_path: Path) -> list[str]:
    """The node's role transitions after its start decision (lines `role a -> b ...`)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in lines if " role " in ln and " -> " in ln and "role starting ->" not in ln]


def log(text: str) -> None:
    print(text, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.realtime_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 500 clients, groups of 200 and 500, 1,000 cycles, "
                        "3 rounds (the peers too, with --peer-wait 3)")
    p.add_argument("--clients", type=int, help="waiting clients in (a) (default 10000)")
    p.add_argument("--small", type=int, help="members of the group in (b) (default 1000)")
    p.add_argument("--big", type=int, help="members of the group in (c) (default 5000)")
    p.add_argument("--rounds", type=int, help="messages per group size (default 5)")
    p.add_argument("--cycles", type=int, help="connect-wait-disconnect cycles (default 10000)")
    p.add_argument("--cycle-batch", type=int, default=2000, help="clients per cycle batch")
    p.add_argument("--processes", type=int, default=4, help="load-client processes (default 4)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin the server to one CPU and the load client to another "
                        "(default: on when two CPUs are usable)")
    p.add_argument("--phases", default="abcd",
                   help="which phases to run, in order (default abcd)")
    p.add_argument("--peers", default="all",
                   help="peer baselines to run after hachat with the same load and sizes, "
                        "comma-separated from " + ",".join(PEERS) + "; 'all' (default) or "
                        "'none'")
    p.add_argument("--peer-wait", type=float,
                   help="seconds a peer may go without parking one more waiter, answering "
                        "the POST or answering the waiters before it is reported with what "
                        "it did (default 10; 3 with --quick)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = p.parse_args(argv)
    defaults = ((500, 200, 500, 3, 1000) if args.quick else (10_000, 1000, 5000, 5, 10_000))
    for name, value in zip(("clients", "small", "big", "rounds", "cycles"), defaults,
                           strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not (0 < args.small <= args.big <= args.clients):
        p.error("need 0 < --small <= --big <= --clients")
    if args.peer_wait is None:
        args.peer_wait = 3.0 if args.quick else 10.0
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    if names == ["all"]:
        names = list(PEERS)
    elif names == ["none"]:
        names = []
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        p.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    args.peers = tuple(dict.fromkeys(names))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    report = Bench(args).run()
    if args.peers:
        PeerBench(args, report).run()
    elapsed = time.monotonic() - started
    cpus = report.figures.get("cpus", {})
    pinned = (f"server pinned to CPU {sorted(cpus['server'])}, clients to "
              f"{sorted(cpus['clients'])}" if cpus.get("server") else "no pinning")
    title = (f"hachat real-time benchmark ({'quick' if args.quick else 'full'}): SQLite, "
             f"{args.processes} client processes, {os.cpu_count()} CPUs ({pinned}), "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f} s, src {source_revision()}")
    print(title)
    print(format_table(("measure", "value", "target", "verdict"), report.rows))
    if args.peers:
        print()
        print(f"Peers: the same load client, sizes and pinning; p50/p99/max are medians over "
              f"the {args.rounds} rounds. p99 hachat/peer = hachat's p99 divided by the "
              f"peer's: below 1 hachat answered faster, above 1 slower (lower is better for "
              f"hachat). A peer that could not hold or answer everyone within "
              f"{args.peer_wait:g} s is shown with what it did, without a ratio.")
        print(peer_table(args, report))
    failed = [r for r in report.rows if r[3] == "FAIL"]
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"title": title, "params": report.params, "figures": report.figures,
             "rows": report.rows}, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
