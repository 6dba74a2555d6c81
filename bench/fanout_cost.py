"""Fan-out CPU cost per waiter: two (or more) source trees side by side, rounds interleaved.

    python -m bench.fanout_cost --src base=/tmp/hachat-base/src --src new=src
    python -m bench.fanout_cost --src new=src --waiters 1000 --rounds 9 --profile /tmp/fo

Each source tree gets its own server process (`PYTHONPATH=<src>`): hachat's own `HTTPServer`
with an `EventHub` and a single inline route that parks `GET /wait?since=C` with
`hub.wait(...)` and `render_events`, exactly what `GET /events` does once its database query
found nothing (no database here: the cost measured is the hub's and the HTTP layer's), with
the garbage collector set up as `hachat serve` sets it (where the tree does that). This
process is the client: it parks `--waiters` keep-alive connections on every server, then, round
by round and in alternating order, tells one server to publish one event to the group they all
watch and reads every answer.

Measured per round and server: the CPU time of the server's loop thread (user + kernel, from
its thread CPU clock) between just before the event is completed and the moment the client
has read the last answer, divided by the number of waiters: the fan-out's cost per waiter,
including the kernel's loopback send. Also: the CPU time of the cyclic garbage collector
(any thread) over the whole round, parking included, per waiter. The rounds alternate between the servers, so that a
change in the machine's load hits them alike; the paired ratio per round is the figure to
trust on a shared machine. The server is pinned to CPU 0 and this client to CPU 1 (when both
exist), as in `bench.realtime_bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import pinning_plan, raise_nofile_limit

GROUPS = (1, 2, 3)  # each waiter watches three groups, as in the realtime bench
GROUP = 1  # the group posted to

# ============================================================================================
# The server side (runs in a child process with PYTHONPATH=<src>)
# ============================================================================================


def serve(profile_dir: str | None, gc_spec: str | None) -> None:
    """Start the server, print its port, then obey one command per line on stdin."""
    import gc
    import threading

    from hachat.api.event_routes import render_events
    from hachat.http.messages import HTTPError, Request
    from hachat.http.server import HTTPServer
    from hachat.realtime.events import Event
    from hachat.realtime.hub import EventHub
    from hachat.settings import HTTPSettings

    class Wait:
        blocking = False

        def __call__(self, request: Request) -> Any:  # a Deferred
            since = int(request.query_string.partition("since=")[2] or "0")
            user = int(request.headers.get("x-user", "1"))
            deferred = hub.wait(user, frozenset(GROUPS), since, since, 300.0, render_events)
            if deferred is None:
                raise HTTPError(410, "cursor_expired", "re-query")
            return deferred

    class App:
        route = Wait()

        def resolve(self, request: Request) -> Wait:
            if request.path != "/wait":
                raise HTTPError(404, "not_found", request.path)
            return self.route

    settings = HTTPSettings(host="127.0.0.1", port=0, workers=2, keepalive_timeout=900.0,
                            header_timeout=900.0, max_connections=50_000)
    server = HTTPServer(App(), settings)
    hub = EventHub(server.loop)
    hub.reset(0)
    server.start_background()
    ident: list[int] = []
    got = threading.Event()
    server.loop.call_soon_threadsafe(lambda: (ident.append(threading.get_ident()), got.set()))
    got.wait(10)
    if gc_spec is None:  # what `hachat serve` does after start-up, in trees that have it
        try:
            from hachat.cli import tune_garbage_collector
        except ImportError:
            pass
        else:
            tune_garbage_collector()
    for part in (gc_spec or "").split(","):  # the garbage collector's settings to try
        if part == "freeze":
            gc.freeze()
        elif part.startswith("threshold="):
            gc.set_threshold(*map(int, part.split("=", 1)[1].split("/")))
    clock = time.pthread_getcpuclockid(ident[0])
    profiler = None
    gc_cost = GcCost()
    print(json.dumps({"port": server.address[1],
                      "hachat": sys.modules["hachat.http.server"].__file__}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "waiters":
            reply: object = hub.stats()["waiters"]
        elif cmd[0] == "cpu":
            # The thread CPU clock is exact; the user/kernel split (getrusage, which must run
            # on the thread itself) is the kernel's estimate, good over several rounds.
            box: list = []
            on_loop(server, partial(thread_rusage, box))
            reply = (time.clock_gettime_ns(clock), box[0].ru_utime, box[0].ru_stime,
                     gc_cost.full, gc_cost.ns)
        elif cmd[0] == "publish":
            ticket = hub.reserve()
            payload = {"id": ticket.position, "groupId": GROUP, "userId": 1,
                       "username": "poster", "content": f"round {cmd[1]} to everyone",
                       "createdAt": "2026-12-03T18:00:00.000000Z", "epoch": 1,
                       "clientMessageId": None}
            hub.complete(ticket, Event(ticket.position, "message.created", GROUP, None,
                                       payload, payload["createdAt"]))
            reply = ticket.position
        elif cmd[0] == "profile" and profile_dir:
            import cProfile

            if cmd[1] == "on":
                profiler = cProfile.Profile()
                on_loop(server, profiler.enable)
            elif profiler is not None:
                on_loop(server, profiler.disable)
                profiler.dump_stats(os.path.join(profile_dir, cmd[2] + ".prof"))
            reply = "ok"
        elif cmd[0] == "quit":
            break
        else:
            reply = f"unknown {cmd[0]}"
        print(json.dumps(reply), flush=True)
    server.shutdown(grace=1.0)


class GcCost:
    """The cyclic garbage collector's passes in this process: how many were full (gen2), and
    the CPU time all of them took (on whichever thread ran them)."""

    def __init__(self) -> None:
        import gc

        self.full = 0
        self.ns = 0
        self._start = 0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.thread_time_ns()
        else:
            self.ns += time.thread_time_ns() - self._start
            self.full += info["generation"] == 2


def thread_rusage(box: list) -> None:
    import resource

    box.append(resource.getrusage(resource.RUSAGE_THREAD))


def on_loop(server: Any, fn: Callable[[], object]) -> None:
    """Run `fn()` on the server's loop thread and wait for it (cProfile works per thread)."""
    import threading

    done = threading.Event()
    server.loop.call_soon_threadsafe(lambda: (fn(), done.set()))
    done.wait(10)


# ============================================================================================
# The client side (this process)
# ============================================================================================


class Server:
    """A server child process for one source tree, and the waiters parked on it."""

    def __init__(self, name: str, src: str, cpus: set[int] | None, waiters: int,
                 profile_dir: str | None) -> None:
        self.name = name
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(src).resolve()), str(Path(__file__).resolve().parent.parent)]))
        src, _, gc_spec = src.partition("@")
        argv = [sys.executable, "-m", "bench.fanout_cost", "--serve"]
        if gc_spec:
            argv += ["--gc", gc_spec]
        if profile_dir:
            argv += ["--profile", profile_dir]

        def setup() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)
            raise_nofile_limit()

        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, preexec_fn=setup)
        hello = json.loads(self.proc.stdout.readline())
        self.port = hello["port"]
        self.module = hello["hachat"]
        self.cursor = 0
        self.socks: list[socket.socket] = []
        self.ep = select.epoll()
        self.by_fd: dict[int, socket.socket] = {}
        for _ in range(waiters):
            s = socket.create_connection(("127.0.0.1", self.port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            self.socks.append(s)
            self.by_fd[s.fileno()] = s
            self.ep.register(s.fileno(), select.EPOLLIN)

    def command(self, *words: object) -> object:
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def park(self) -> None:
        for i, s in enumerate(self.socks):
            s.sendall(f"GET /wait?since={self.cursor} HTTP/1.1\r\nHost: b\r\n"
                      f"X-User: {i + 10}\r\n\r\n".encode())
        deadline = time.monotonic() + 60
        while self.command("waiters") != len(self.socks):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: waiters not parked")
            time.sleep(0.02)

    def round(self, label: str) -> dict[str, float]:
        """Park every waiter, publish one event and read every answer: the loop thread's CPU
        per waiter for the fan-out; the garbage collector's for the whole cycle."""
        gc0 = self.command("cpu")
        self.park()
        time.sleep(0.2)
        n = len(self.socks)
        cpu0 = self.command("cpu")
        t0 = time.monotonic()
        position = self.command("publish", label)
        expect = f'"cursor":{position}'.encode()
        pending = {s.fileno(): b"" for s in self.socks}
        last = t0
        while pending:
            events = self.ep.poll(30)
            if not events:
                raise TimeoutError(f"{self.name}: {len(pending)} answers missing")
            now = time.monotonic()
            for fd, _ev in events:
                data = self.by_fd[fd].recv(65536)
                if fd not in pending:
                    raise RuntimeError(f"{self.name}: unexpected bytes {data[:80]!r}")
                buf = pending[fd] + data
                if not buf.endswith(b"}\n"):
                    pending[fd] = buf
                    continue
                if not buf.startswith(b"HTTP/1.1 200 ") or expect not in buf:
                    raise RuntimeError(f"{self.name}: wrong answer {buf[:300]!r}")
                del pending[fd]
                last = now
        cpu1 = self.command("cpu")
        self.cursor = position
        return {"us_per_waiter": (cpu1[0] - cpu0[0]) / 1000 / n,
                "user_us": (cpu1[1] - cpu0[1]) * 1e6 / n, "sys_us": (cpu1[2] - cpu0[2]) * 1e6 / n,
                "wall_ms": (last - t0) * 1000,
                "gc_us": (cpu1[4] - gc0[4]) / 1000 / n, "gc_full": cpu1[3] - gc0[3]}

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.ep.close()
        with contextlib.suppress(OSError, ValueError):
            self.command("quit")
        self.proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fanout_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", action="append", metavar="NAME=DIR[@GC]",
                   help="a source tree to measure (repeatable; default: this tree's src). "
                        "Its server sets the garbage collector up as `hachat serve` does, "
                        "or else as @GC says: 'default' (leave it), 'freeze' and/or "
                        "'threshold=A/B/C', comma-separated")
    p.add_argument("--waiters", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=7, help="measured rounds per tree")
    p.add_argument("--profile", metavar="DIR", help="cProfile the loop thread of each tree "
                   "during one extra round (the files go to DIR)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gc", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        serve(a.profile, a.gc)
        return 0
    raise_nofile_limit()
    trees = [s.split("=", 1) for s in (a.src or [f"this={Path('src').resolve()}"])]
    server_cpus, client_cpus = pinning_plan() if a.pin else (None, None)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    servers = [Server(name, src, server_cpus, a.waiters, a.profile) for name, src in trees]
    results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    try:
        for s in servers:
            print(f"{s.name}: {s.module}", flush=True)
            s.round("warm-up")
        for r in range(a.rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for s in order:
                res = s.round(str(r))
                results[s.name].append(res)
                print(f"round {r + 1} {s.name}: {res['us_per_waiter']:.2f} us/waiter, "
                      f"last answer after {res['wall_ms']:.1f} ms", flush=True)
        if a.profile:
            for s in servers:
                s.command("profile", "on")
                s.round("profile")
                s.command("profile", "off", s.name)
    finally:
        for s in servers:
            s.close()
    print(f"\n{a.waiters} waiters, {a.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.2f}; median per tree:")
    first = servers[0].name
    for s in servers:
        rs = results[s.name]
        us = statistics.median(x["us_per_waiter"] for x in rs)
        wall = statistics.median(x["wall_ms"] for x in rs)
        user = sum(x["user_us"] for x in rs) / len(rs)
        kernel = sum(x["sys_us"] for x in rs) / len(rs)
        gc_us = sum(x["gc_us"] for x in rs) / len(rs)
        full = sum(x["gc_full"] for x in rs)
        line = (f"  {s.name:>10}: {us:6.2f} us/waiter CPU (mean split: user {user:.1f}, "
                f"kernel {kernel:.1f}), last answer {wall:6.1f} ms; garbage collector "
                f"{gc_us:.2f} us/waiter per park-and-answer cycle ({full} full passes)")
        if s.name != first:
            ratios = [x["us_per_waiter"] / y["us_per_waiter"]
                      for x, y in zip(rs, results[first], strict=True)]
            line += (f"; {s.name}/{first} per round: median {statistics.median(ratios):.2f} "
                     f"[{' '.join(f'{q:.2f}' for q in ratios)}]")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
