"""HTTP benchmark: hachat's own server side by side with the best-known Python servers (issue 6).

    python -m bench.http_bench                 # 10 s x 3 runs per measurement (about 5 minutes)
    python -m bench.http_bench --quick         # 3 s x 1 run (CI smoke, about a minute)
    python -m bench.http_bench --json out.json --duration 20 --runs 5

What it measures, each server pinned to CPU 0 and wrk (`-t1 -c50 --latency`) pinned to CPU 1:

1. `GET /health` (keep-alive, small JSON) on hachat and on baseline servers from bench/peers/
   (aiohttp; uvicorn + starlette with httptools and uvloop; waitress; the standard library's
   ThreadingHTTPServer with its defaults), started one after another: req/s, p99, hachat/peer.
2. `POST /messages` with a valid token on hachat with SQLite and with PostgreSQL (a scratch
   database, dropped afterwards): messages/s, p99, and durability: the rows in the messages
   table are counted afterwards and compared with wrk's count of 2xx answers.
3. `GET /health` on hachat with none, then with 5,000 idle keep-alive connections and 5,000
   waiting long-polls (`GET /events?since=...&timeout=60`) held open by helper processes (this
   module with `--hold`); GET /stats confirms they are established and parked.

Then a table, PASS/FAIL against the issue's targets, and a "figures" block for an issue note.
`--profile DIR` adds one unmeasured run per hachat scenario under py-spy (flame graphs + the
hottest functions). The exit status is 0 unless something broke; `--strict` also fails on a
missed target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import linecache
import os
import platform
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    ManagedProcess,
    WrkResult,
    available_cpus,
    cpu_busy_percent,
    create_pg_database,
    drop_pg_database,
    ensure_wrk,
    fmt_int,
    fmt_ms,
    free_port,
    http_call,
    median,
    pg_available,
    pg_url,
    pinning_plan,
    process_cpu_seconds,
    process_cpu_split,
    raise_nofile_limit,
    run_wrk,
    start_hachat,
    wait_until_serving,
)

PEERS_DIR = BENCH_DIR / "peers"
SERVERS = ("hachat", "aiohttp", "uvicorn", "waitress", "stdlib")
LABELS = {
    "hachat": "hachat",
    "aiohttp": "aiohttp (web.Application)",
    "uvicorn": "uvicorn+starlette (httptools, uvloop)",
    "waitress": "waitress (4 threads)",
    "stdlib": "stdlib ThreadingHTTPServer (defaults)",
}
PASSWORD = "bench password 123"

# Targets from issue 6.
TARGET_VS_AIOHTTP = 1.0
TARGET_VS_WAITRESS = 2.0
TARGET_PG_MSGS = 2000.0
TARGET_IDLE_RATIO = 0.90


# -- options ------------------------------------------------------------------------------------
@dataclass
class Options:
    duration: float
    runs: int
    warmup: float
    connections: int
    servers: list[str]
    post: bool
    postgres: bool
    idle: bool
    idle_count: int
    poll_count: int
    poll_route: str
    poll_timeout: int
    json_path: Path | None
    profile_dir: Path | None
    strict: bool
    quick: bool
    keep: bool = False
    log_level: str = "WARNING"
    server_cpus: set[int] | None = None
    load_cpus: set[int] | None = None


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.http_bench",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    p.add_argument("--runs", type=int, default=3, help="wrk runs per measurement; medians (3)")
    p.add_argument("--quick", action="store_true", help="3 s x 1 run: a smoke test for CI")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of unmeasured load before each server's runs (1)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"GET /health servers, comma-separated (default: {','.join(SERVERS)})")
    p.add_argument("--no-post", action="store_true", help="skip POST /messages")
    p.add_argument("--no-postgres", action="store_true", help="POST /messages on SQLite only")
    p.add_argument("--no-idle", action="store_true",
                   help="skip the idle-connections / long-polls measurement")
    p.add_argument("--idle-connections", type=int, default=5000,
                   help="idle keep-alive connections to hold open (5000)")
    p.add_argument("--long-polls", type=int, default=5000,
                   help="waiting long-polls to hold open (5000)")
    p.add_argument("--poll-route", choices=("events", "status"), default="events",
                   help="long-polls on GET /events (default) or GET /subscribe/status")
    p.add_argument("--poll-timeout", type=int, default=60, help="long-poll timeout, s (60)")
    p.add_argument("--json", dest="json_path", type=Path, help="also write results as JSON")
    p.add_argument("--profile", dest="profile_dir", type=Path,
                   help="after measuring, profile hachat with py-spy during one extra run per "
                        "scenario; flame graphs and hot functions go to this directory")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--log-level", default="WARNING",
                   help="hachat's LOG_LEVEL (WARNING); with --keep its logs are kept")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory (server logs, SQLite files, Lua scripts)")
    p.add_argument("--hold", help=argparse.SUPPRESS)  # internal: the connection-holder helper
    args = p.parse_args(argv)
    if args.hold:
        raise SystemExit(hold_main(json.loads(args.hold)))
    if args.quick:
        args.duration, args.runs = 3.0, 1
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown:
        p.error(f"unknown servers {unknown}; choose from {', '.join(SERVERS)}")
    if args.runs < 1 or args.duration <= 0:
        p.error("--runs must be >= 1 and --duration > 0")
    return Options(args.duration, args.runs, args.warmup, args.connections, servers,
                   not args.no_post, not args.no_postgres, not args.no_idle,
                   args.idle_connections, args.long_polls, args.poll_route, args.poll_timeout,
                   args.json_path, args.profile_dir, args.strict, args.quick, args.keep,
                   args.log_level.upper())


# -- results ------------------------------------------------------------------------------------
@dataclass
class Series:
    """Several wrk runs of one scenario."""

    name: str
    runs: list[WrkResult] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # server CPU seconds during each run
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_share(self) -> float:
        """Median share of one core the server used during the runs."""
        return median(c / r.seconds for c, r in zip(self.cpu, self.runs, strict=True)
                      if r.seconds)

    @property
    def per_cpu_second(self) -> float:
        """Median requests answered per CPU-second of the server: less sensitive than req/s
        to other work stealing the server's core."""
        return median(r.requests / c for c, r in zip(self.cpu, self.runs, strict=True) if c > 0)

    @property
    def rps(self) -> float:
        return median(r.rps for r in self.runs)

    @property
    def p99(self) -> float:
        return median(r.p99_ms for r in self.runs)

    @property
    def p50(self) -> float:
        return median(r.p50_ms for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.error_count for r in self.runs)

    @property
    def non_2xx(self) -> int:
        return sum(r.non_2xx for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "median_rps": self.rps, "median_p99_ms": self.p99,
                "median_p50_ms": self.p50, "socket_errors": self.errors,
                "non_2xx": self.non_2xx, "server_cpu_seconds": self.cpu,
                "median_cpu_share": self.cpu_share,
                "median_requests_per_cpu_second": self.per_cpu_second,
                "runs": [r.as_dict() for r in self.runs],
                **self.notes}


@dataclass
class Report:
    options: Options
    started: float = field(default_factory=time.time)
    health: dict[str, Series] = field(default_factory=dict)
    posts: dict[str, Series] = field(default_factory=dict)
    idle: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool | None, str]] = field(default_factory=list)
    load_start: tuple[float, float, float] = field(default_factory=os.getloadavg)
    busy_before: dict[int, float] = field(default_factory=dict)
    load_end: tuple[float, float, float] | None = None
    lease_epochs: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)


def say(text: str) -> None:
    print(text, flush=True)


# -- servers ------------------------------------------------------------------------------------
def start_peer(name: str, workdir: Path, cpus: set[int] | None) -> tuple[ManagedProcess, int]:
    port = free_port()
    py = sys.executable
    if name == "aiohttp":
        argv = [py, str(PEERS_DIR / "aiohttp_server.py"), str(port)]
    elif name == "uvicorn":
        argv = [py, "-m", "uvicorn", "--app-dir", str(PEERS_DIR), "starlette_app:app",
                "--host", "127.0.0.1", "--port", str(port), "--http", "httptools",
                "--loop", "uvloop", "--workers", "1", "--log-level", "warning",
                "--no-access-log"]
    elif name == "waitress":
        argv = [py, str(PEERS_DIR / "waitress_server.py"), str(port)]
    elif name == "stdlib":
        argv = [py, str(PEERS_DIR / "stdlib_server.py"), str(port)]
    else:
        raise ValueError(name)
    proc = ManagedProcess(name, argv, cwd=workdir, log_path=workdir / f"{name}.log", cpus=cpus)
    try:
        wait_until_serving(port, "/health", timeout=30, process=proc)
    except BaseException:
        proc.stop()
        raise
    return proc, port


def start_server(name: str, opts: Options, workdir: Path,
                 env: dict[str, str] | None = None,
                 database_url: str | None = None) -> tuple[ManagedProcess, int]:
    if name == "hachat":
        env = {"LOG_LEVEL": opts.log_level, **(env or {})}
        return start_hachat(workdir / f"hachat-{secrets.token_hex(3)}", env=env,
                            database_url=database_url, cpus=opts.server_cpus)
    return start_peer(name, workdir, opts.server_cpus)


def measure(url: str, opts: Options, label: str, pid: int, *, script: Path | None = None,
            before_run=None, after_run=None) -> Series:
    """An unmeasured warm-up, then opts.runs wrk runs; also the CPU time the server process
    `pid` used during each run (a server that got less than a whole core was starved by
    something else on the machine, and its req/s says less than its req per CPU-second)."""
    series = Series(label)
    if opts.warmup > 0:
        warm = run_wrk(url, duration=opts.warmup, connections=opts.connections, script=script,
                       cpus=opts.load_cpus)
        series.notes["warmup"] = warm.as_dict()
    for i in range(opts.runs):
        if before_run:
            before_run(i)
        cpu0 = process_cpu_seconds(pid)
        result = run_wrk(url, duration=opts.duration, connections=opts.connections,
                         script=script, cpus=opts.load_cpus)
        cpu = process_cpu_seconds(pid) - cpu0
        if result.requests == 0:
            # Nothing answered in the whole run: wrk then prints zero latencies, not none.
            result.percentiles_ms = {k: float("nan") for k in result.percentiles_ms}
            result.rps = float("nan")
            series.notes.setdefault("empty_runs", 0)
            series.notes["empty_runs"] += 1
        series.runs.append(result)
        series.cpu.append(cpu)
        if after_run:
            after_run(i)
        extra = ""
        if result.non_2xx or result.error_count:
            extra = f"  non-2xx {result.non_2xx}, socket errors {result.errors}"
        say(f"    run {i + 1}/{opts.runs}: {result.rps:>10,.0f} req/s   p50 "
            f"{fmt_ms(result.p50_ms):>9}   p99 {fmt_ms(result.p99_ms):>9}   server CPU "
            f"{100 * cpu / result.seconds if result.seconds else 0:4.0f} %{extra}")
    return series


# -- profiling (optional) ----------------------------------------------------------------------
def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def profile_run(pid: int, url: str, opts: Options, tag: str, script: Path | None = None) -> dict:
    """Two unmeasured wrk runs with py-spy attached to `pid`.

    1. `--gil`, raw collapsed stacks: only the thread holding the GIL is sampled, so the
       summary says where the Python CPU time goes (threads waiting for the GIL, the database
       or the network are left out; system calls release the GIL, so the user/system split
       of the process's CPU time is reported next to it).
    2. a flame graph of every thread (`--threads`), for looking around.
    """
    tool = py_spy()
    if tool is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    out = opts.profile_dir
    out.mkdir(parents=True, exist_ok=True)
    seconds = max(5, int(opts.duration))
    found: dict[str, Any] = {}
    runs = (("raw", out / f"{tag}.txt", ["--gil"]), ("flamegraph", out / f"{tag}.svg", []))
    for fmt, path, extra in runs:
        rec = subprocess.Popen(
            [tool, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
             "--format", fmt, "--output", str(path), "--threads", "--full-filenames", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)
        user0, system0 = process_cpu_split(pid)
        result = run_wrk(url, duration=seconds, connections=opts.connections, script=script,
                         cpus=opts.load_cpus)
        user1, system1 = process_cpu_split(pid)
        try:
            _, err = rec.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            rec.terminate()
            _, err = rec.communicate(timeout=5)
        found[fmt] = str(path)
        found[f"rps_under_profiler_{fmt}"] = result.rps
        if fmt == "raw":
            used = (user1 - user0) + (system1 - system0)
            found["cpu_seconds"] = round(used, 2)
            found["system_share"] = round((system1 - system0) / used, 3) if used else None
            found["cpu_ms_per_request"] = (round(1000 * used / result.requests, 3)
                                           if result.requests else None)
        if not path.exists():
            found["error"] = f"py-spy wrote no {fmt}: {(err or '')[-300:]}"
    raw = out / f"{tag}.txt"
    if raw.exists():
        found.update(summarize_collapsed(raw.read_text()))
    return found


# A thread whose top frame is on a line like these is waiting, not working: py-spy cannot always
# tell (a worker blocked in SimpleQueue.get, the loop in epoll.poll), so those samples are set
# aside and the shares below are of the busy samples only.
_WAITING = re.compile(r"(\.get\(|\bget\(\)|\.wait\(|\bwaiter\.acquire\(|\bpoll\(|\bselect\("
                      r"|\bsleep\(|\.acquire\(|\.join\()")


def _waiting_frame(frame: str) -> bool:
    where = frame.rpartition(" (")[2].rstrip(")")
    path, _, line_no = where.rpartition(":")
    if not line_no.isdigit():
        return False
    return bool(_WAITING.search(linecache.getline(path, int(line_no))))


def summarize_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Collapsed stacks ("thread (tid): name;frame;...;frame count") -> shares of the busy
    samples: per thread, per function on top of the stack (self), per function anywhere
    (total), and per source line on top of the stack."""
    waiting = 0
    own: Counter[str] = Counter()
    own_lines: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = stack.split(";")
        thread = "?"
        if frames and frames[0].startswith(("thread ", "process ")):
            head = frames.pop(0)
            thread = head.split(": ", 1)[1] if ": " in head else "unnamed thread"
        if not frames:
            continue
        if _waiting_frame(frames[-1]):
            waiting += n
            continue
        samples += n
        threads[thread] += n
        own[_short_frame(frames[-1])] += n
        own_lines[_short_frame(frames[-1], keep_line=True)] += n
        for name in {_short_frame(f) for f in frames}:
            total[name] += n
    if not samples:
        return {"samples": 0, "waiting_samples": waiting}

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100.0 * n / samples, 1)] for name, n in counter.most_common(top)]

    return {"samples": samples, "waiting_samples": waiting, "threads": share(threads), "self": share(own),
            "self_lines": share(own_lines), "total": share(total)}


def _short_frame(frame: str, keep_line: bool = False) -> str:
    """'function (path/to/file.py:123)' -> 'function (to/file.py)' (with ':123' if asked)."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file_part, _, line_no = where.rpartition(":")
    if not file_part:
        file_part, line_no = where, ""
    short = "/".join(Path(file_part).parts[-2:]) if file_part else ""
    if keep_line and line_no:
        short += f":{line_no}"
    return f"{name} ({short})" if short else name


# -- 1. GET /health -----------------------------------------------------------------------------
def bench_health(opts: Options, report: Report, workdir: Path) -> None:
    say(f"\n== GET /health: wrk -t1 -c{opts.connections} -d{opts.duration:g}s --latency, "
        f"{opts.runs} run(s) per server ==")
    for name in opts.servers:
        say(f"  {LABELS[name]}")
        proc, port = start_server(name, opts, workdir)
        try:
            url = f"http://127.0.0.1:{port}/health"
            body = http_call(port, "GET", "/health").body
            epoch = hachat_epoch(port) if name == "hachat" else None
            series = measure(url, opts, name, proc.pid)
            if name == "hachat":
                note_lease(report, "GET /health", epoch, hachat_epoch(port))
            if series.notes.get("empty_runs"):
                report.problems.append(f"GET /health on {name}: {series.notes['empty_runs']} "
                                       "run(s) got no answer at all (left out of the medians)")
            series.notes["body_bytes"] = len(body)
            series.notes["body"] = body.decode(errors="replace")
            report.health[name] = series
            if name == "hachat" and opts.profile_dir:
                say("    profiling one more run under py-spy (not counted)")
                report.profiles["health"] = profile_run(proc.pid, url, opts, "hachat-health")
        except Exception as exc:
            report.problems.append(f"GET /health on {name}: {exc}")
            say(f"    FAILED: {exc}")
        finally:
            proc.stop()


# -- 2. POST /messages --------------------------------------------------------------------------
def login(port: int, username: str) -> dict[str, Any]:
    reply = http_call(port, "POST", "/login", {"username": username, "password": PASSWORD},
                      timeout=30)
    if reply.status not in (200, 201):
        raise RuntimeError(f"/login {username}: {reply.status} {reply.body[:200]!r}")
    return reply.json()


def create_group(port: int, token: str, name: str, member_ids: list[int]) -> int:
    reply = http_call(port, "POST", "/groups", {"name": name, "memberIds": member_ids},
                      token=token, timeout=30)
    if reply.status != 201:
        raise RuntimeError(f"POST /groups: {reply.status} {reply.body[:200]!r}")
    return reply.json()["id"]


def lua_string(text: str) -> str:
    """A Lua string literal (LuaJIT has no \\u escapes, so ASCII only)."""
    if not text.isascii():
        raise ValueError("ASCII only")
    return json.dumps(text)


def write_post_script(path: Path, token: str, group_id: int) -> Path:
    body = json.dumps({"groupId": group_id, "content": "benchmark message: hello, group!"})
    path.write_text(
        "-- generated by bench/http_bench.py: POST /messages with a valid token\n"
        'wrk.method = "POST"\n'
        f"wrk.body = {lua_string(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = {lua_string("Bearer " + token)}\n')
    return path


def count_messages_sql(database_url: str, group_id: int) -> int:
    if database_url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(database_url[len("sqlite:///"):])) as db:
            return db.execute("SELECT count(*) FROM messages WHERE group_id = ?",
                              (group_id,)).fetchone()[0]
    import psycopg

    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM messages WHERE group_id = %s",
                            (group_id,)).fetchone()[0]


def count_messages_api(port: int, token: str, group_id: int) -> int:
    """Page through GET /messages (newest first, 200 a page) and count."""
    total, before = 0, None
    while True:
        query = f"/messages?groupId={group_id}&limit=200"
        if before is not None:
            query += f"&before={before}"
        reply = http_call(port, "GET", query, token=token, timeout=30)
        if reply.status != 200:
            raise RuntimeError(f"GET /messages: {reply.status} {reply.body[:200]!r}")
        page = reply.json()
        total += len(page["messages"])
        before = page.get("nextBefore")
        if not before or not page["messages"]:
            return total


def bench_post(opts: Options, report: Report, workdir: Path, db_kind: str) -> None:
    pg_name = None
    if db_kind == "postgres":
        if not pg_available():
            report.problems.append("POST /messages on PostgreSQL: no server at 127.0.0.1:5432")
            say("  PostgreSQL is not reachable at 127.0.0.1:5432: skipped")
            return
        pg_name = create_pg_database()
        database_url = pg_url(pg_name)
        say(f"  hachat on PostgreSQL (scratch database {pg_name})")
    else:
        database_url = None
        say("  hachat on SQLite")
    proc = None
    try:
        proc, port = start_server("hachat", opts, workdir, database_url=database_url)
        sql_url = database_url or _sqlite_url_of(proc)
        user = login(port, f"poster_{secrets.token_hex(3)}")
        token = user["token"]
        group = create_group(port, token, "bench", [])
        script = write_post_script(workdir / f"post-{db_kind}.lua", token, group)
        url = f"http://127.0.0.1:{port}/messages"
        epoch = hachat_epoch(port)
        series = measure(url, opts, db_kind, proc.pid, script=script)
        note_lease(report, f"POST /messages on {db_kind}", epoch, hachat_epoch(port))
        wrk_runs = list(series.runs)
        if "warmup" in series.notes:
            warm = series.notes["warmup"]
            acked_warm = warm["requests"] - warm["non_2xx"]
        else:
            acked_warm = 0
        if opts.profile_dir:
            say("    profiling one more run under py-spy (not counted)")
            before = count_messages_sql(sql_url, group)
            prof = profile_run(proc.pid, url, opts, f"hachat-post-{db_kind}", script)
            report.profiles[f"post-{db_kind}"] = prof
            prof_extra = count_messages_sql(sql_url, group) - before
        else:
            prof_extra = 0
        acknowledged = sum(r.ok_requests for r in wrk_runs) + acked_warm
        time.sleep(0.5)  # let requests cut off when wrk stopped finish
        stored_sql = count_messages_sql(sql_url, group) - prof_extra
        stored_api = count_messages_api(port, token, group) - prof_extra
        invocations = len(wrk_runs) + (1 if acked_warm else 0)
        series.notes.update({
            "database": db_kind, "acknowledged": acknowledged, "stored_sql": stored_sql,
            "stored_api": stored_api, "durable": stored_sql >= acknowledged
            and stored_api >= acknowledged,
            "unacknowledged_but_stored": stored_sql - acknowledged,
            "wrk_invocations": invocations,
        })
        report.posts[db_kind] = series
        say(f"    acknowledged (2xx) {acknowledged:,}; rows stored {stored_sql:,} (SQL), "
            f"{stored_api:,} (GET /messages) -> "
            f"{'every acknowledged message is stored' if series.notes['durable'] else 'LOST'}")
    except Exception as exc:
        report.problems.append(f"POST /messages on {db_kind}: {exc}")
        say(f"    FAILED: {exc}")
    finally:
        if proc is not None:
            proc.stop()
        if pg_name:
            try:
                drop_pg_database(pg_name)
            except Exception as exc:
                report.problems.append(f"could not drop database {pg_name}: {exc}")


def _sqlite_url_of(proc: ManagedProcess) -> str:
    return f"sqlite:///{proc.log_path.parent / 'hachat.db'}"


# -- 3. idle connections and waiting long-polls ------------------------------------------------
class Holder:
    """A helper process (this module with --hold) that opens and keeps connections."""

    def __init__(self, spec: dict[str, Any], cpus: set[int] | None, workdir: Path) -> None:
        self.kind = spec["kind"]
        self.proc = ManagedProcess(
            f"holder-{self.kind}",
            [sys.executable, "-m", "bench.http_bench", "--hold", json.dumps(spec)],
            cwd=str(BENCH_DIR.parent), log_path=workdir / f"holder-{self.kind}.log",
            cpus=cpus, stdin=subprocess.PIPE, capture_stdout=True)
        self.ready: dict[str, Any] | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.proc.stdout:
            with self._cond:
                self._lines.append(line.strip())
                self._cond.notify_all()
        with self._cond:
            self._lines.append("eof")
            self._cond.notify_all()

    def expect(self, word: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, line in enumerate(self._lines):
                    if line.startswith(word + " ") or line == "eof":
                        del self._lines[: i + 1]
                        if line == "eof":
                            raise RuntimeError(f"{self.proc.name} exited:\n"
                                               f"{self.proc.log_tail()}")
                        return json.loads(line[len(word) + 1:])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.proc.name}: no '{word}' in {timeout:.0f} s")
                self._cond.wait(left)

    def command(self, word: str) -> dict[str, Any]:
        self.proc.proc.stdin.write(word + "\n")
        self.proc.proc.stdin.flush()
        return self.expect(word, 30)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.proc.stdin.write("quit\n")
            self.proc.proc.stdin.flush()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.proc.wait(20)
        self.proc.stop()


def hachat_epoch(port: int) -> int | None:
    """The lease epoch hachat reports on /health: it goes up each time the node loses and
    retakes the lease (and every loss answers parked long-polls and writes with 503)."""
    try:
        return (http_call(port, "GET", "/health", timeout=10).json() or {}).get("epoch")
    except (OSError, ValueError):
        return None


def note_lease(report: Report, scenario: str, before: int | None, after: int | None) -> None:
    report.lease_epochs[scenario] = (before, after)
    if before != after:
        say(f"    note: hachat lost and retook its lease during {scenario} "
            f"(epoch {before} -> {after}): requests were refused with 503 meanwhile")


def admin_stats(port: int, admin_token: str) -> dict[str, Any]:
    reply = http_call(port, "GET", "/stats", token=admin_token, timeout=30)
    if reply.status != 200:
        raise RuntimeError(f"GET /stats: {reply.status} {reply.body[:200]!r}")
    return reply.json()


def parked_counts(stats: dict[str, Any], route: str) -> tuple[int, int, int]:
    """(open connections, parked requests, waiters on the chosen long-poll)."""
    http = stats.get("http", {})
    waiters = (stats.get("hub", {}) if route == "events" else stats.get("status", {}))
    return http.get("connections", 0), http.get("parked", 0), waiters.get("waiters", 0)


def bench_idle(opts: Options, report: Report, workdir: Path) -> None:
    n_idle, n_polls = opts.idle_count, opts.poll_count
    say(f"\n== GET /health on hachat with {n_idle:,} idle keep-alive connections and "
        f"{n_polls:,} waiting long-polls (GET /{opts.poll_route}) versus none ==")
    admin = secrets.token_urlsafe(16)
    # The server must not close idle connections while we measure: its keep-alive timeout
    # (75 s by default) is raised for this scenario only; long-polls are re-sent if answered.
    env = {"ADMIN_TOKEN": admin, "KEEPALIVE_TIMEOUT": "900",
           "POLL_TIMEOUT_MAX": str(max(60, opts.poll_timeout))}
    proc, port = start_server("hachat", opts, workdir, env=env)
    holders: list[Holder] = []
    out: dict[str, Any] = {"idle_connections": n_idle, "long_polls": n_polls,
                           "poll_route": opts.poll_route, "poll_timeout": opts.poll_timeout}
    report.idle = out
    try:
        url = f"http://127.0.0.1:{port}/health"
        # The "none" runs are split: half before the connections are opened, half after they
        # are closed, so that a drift in the machine's load does not masquerade as their cost.
        none_before = (opts.runs + 1) // 2
        none_after = max(1, opts.runs - none_before)
        say(f"  with none open ({none_before} run(s) now, {none_after} after closing them)")
        base = measure(url, replace(opts, runs=none_before), "none", proc.pid)
        out["none"] = base

        # Accounts for the long-polls: a few users in one group, each holding many polls.
        tokens, cursor = [], 0
        if opts.poll_route == "events" and n_polls:
            users = [login(port, f"waiter_{i}_{secrets.token_hex(2)}") for i in range(10)]
            tokens = [u["token"] for u in users]
            create_group(port, tokens[0], "waiting", [u["userId"] for u in users[1:]])
            cursor = http_call(port, "GET", "/events", token=tokens[0]).json()["cursor"]
        elif n_polls:
            cursor = http_call(port, "GET", "/subscribe/status?timeout=0").json()["version"]

        t0 = time.monotonic()
        specs = []
        if n_idle:
            specs.append({"kind": "idle", "port": port, "count": n_idle})
        if n_polls:
            specs.append({"kind": opts.poll_route, "port": port, "count": n_polls,
                          "tokens": tokens, "cursor": cursor, "timeout": opts.poll_timeout})
        for spec in specs:
            holders.append(Holder(spec, opts.load_cpus, workdir))
        for h in holders:
            h.ready = h.expect("ready", 180)
        # Established from the client's side; now wait until the server has them all parked.
        want_conns = n_idle + n_polls
        deadline = time.monotonic() + 120
        while True:
            conns, parked, waiters = parked_counts(admin_stats(port, admin), opts.poll_route)
            conns -= 1  # this /stats request's own connection
            if conns >= want_conns and waiters >= n_polls:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {conns} connections and {waiters} waiters after 120 s "
                                   f"(want {want_conns} and {n_polls})")
            time.sleep(0.5)
        out["setup_seconds"] = round(time.monotonic() - t0, 1)
        say(f"  {conns:,} connections open, {waiters:,} long-polls parked on the server "
            f"(set up in {out['setup_seconds']} s); measuring")
        seen: list[tuple[int, int, int]] = []
        out["server_checks"] = checks = []

        def check(_i: int) -> None:
            stats = admin_stats(port, admin)
            c, p, w = parked_counts(stats, opts.poll_route)
            seen.append((c - 1, p, w))
            node = stats.get("node", {})
            checks.append({"connections": c - 1, "parked": p, "waiters": w,
                           "active": node.get("active"), "epoch": node.get("epoch"),
                           "role": node.get("role")})
            if w < n_polls or c - 1 < want_conns or not node.get("active"):
                say(f"    warning: server now holds {c - 1:,} connections, {w:,} waiters; "
                    f"role {node.get('role')}, epoch {node.get('epoch')}")

        before = [h.command("report") for h in holders]
        epoch = hachat_epoch(port)
        loaded = measure(url, opts, "with", proc.pid, before_run=check, after_run=check)
        after = [h.command("report") for h in holders]
        note_lease(report, "the idle-connections runs", epoch, hachat_epoch(port))
        out["with"] = loaded
        out["min_connections_seen"] = min(s[0] for s in seen)
        out["min_waiters_seen"] = min(s[2] for s in seen)
        out["helper_counters_during_runs"] = {
            h.kind: {k: a[k] - b.get(k, 0) for k in a if a[k] - b.get(k, 0)}
            for h, b, a in zip(holders, before, after, strict=True)
        }
        out["valid"] = (out["min_connections_seen"] >= want_conns
                        and out["min_waiters_seen"] >= n_polls)
        say(f"  before/after each run the server held >= {out['min_connections_seen']:,} "
            f"connections and >= {out['min_waiters_seen']:,} parked long-polls; helper "
            f"activity during the runs: {out['helper_counters_during_runs']}")
        if opts.profile_dir:
            say("    profiling one more run under py-spy (not counted)")
            report.profiles["idle"] = profile_run(proc.pid, url, opts, "hachat-idle")
        for h in holders:
            h.stop()
        holders.clear()
        deadline = time.monotonic() + 60
        while parked_counts(admin_stats(port, admin), opts.poll_route)[0] > 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the server still holds connections 60 s after closing")
            time.sleep(0.2)
        say("  with none open again")
        again = measure(url, replace(opts, runs=none_after, warmup=0), "none", proc.pid)
        base.runs.extend(again.runs)
        base.cpu.extend(again.cpu)
        out["ratio"] = div(loaded.rps, base.rps)
    except Exception as exc:
        report.problems.append(f"idle connections: {exc}")
        say(f"    FAILED: {exc}")
    finally:
        for h in holders:
            h.stop()
        proc.stop()


# -- the helper process ------------------------------------------------------------------------
def hold_main(spec: dict[str, Any]) -> int:
    """Run as `python -m bench.http_bench --hold SPEC`: open spec["count"] connections to
    127.0.0.1:spec["port"] and keep them. kind "idle": one GET /health each, then silence.
    kind "events"/"status": a long-poll each, re-sent whenever it is answered.
    Prints `ready {...}` once every connection has sent its request; answers `report` on stdin
    with its counters; exits on `quit` or end of input."""
    raise_nofile_limit()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_hold(spec))
    return 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and "close" in value.lower():
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


async def _hold(spec: dict[str, Any]) -> None:
    port, kind, count = spec["port"], spec["kind"], spec["count"]
    tokens = spec.get("tokens") or [None]
    timeout = spec.get("timeout", 60)
    counters = {"connected": 0, "answers": 0, "reconnects": 0, "errors": 0, "closed_by_server": 0}
    pending = count
    all_sent = asyncio.Event()
    gate = asyncio.Semaphore(200)  # connections being set up at once
    writers: set[asyncio.StreamWriter] = set()
    host = f"127.0.0.1:{port}"

    def request(token: str | None, cursor: int) -> bytes:
        if kind == "idle":
            path, auth = "/health", ""
        elif kind == "events":
            path = f"/events?since={cursor}&timeout={timeout}"
            auth = f"Authorization: Bearer {token}\r\n"
        else:
            path, auth = f"/subscribe/status?since={cursor}&timeout={timeout}", ""
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode()

    async def one(i: int) -> None:
        nonlocal pending
        token = tokens[i % len(tokens)]
        cursor = spec.get("cursor", 0)
        first = True
        while True:
            writer = None
            try:
                async with gate if first else contextlib.nullcontext():
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writers.add(writer)
                    counters["connected"] += 1
                    if not first:
                        counters["reconnects"] += 1
                    writer.write(request(token, cursor))
                    await writer.drain()
                    if kind == "idle":
                        status, _, _ = await _read_response(reader)
                        if status != 200:
                            counters["errors"] += 1
                if first:
                    first = False
                    pending -= 1
                    if pending == 0:
                        all_sent.set()
                if kind == "idle":
                    await reader.read(1)  # returns only when the server closes the connection
                    counters["closed_by_server"] += 1
                    continue
                while True:
                    status, body, close = await _read_response(reader)
                    counters["answers"] += 1
                    if status == 200:
                        answer = json.loads(body)
                        cursor = answer.get("cursor", answer.get("version", cursor))
                    else:
                        counters["errors"] += 1
                        key = f"status_{status}"
                        counters[key] = counters.get(key, 0) + 1
                        await asyncio.sleep(1.0)
                    if close:
                        counters["closed_by_server"] += 1
                        break
                    writer.write(request(token, cursor))
                    await writer.drain()
            except (OSError, asyncio.IncompleteReadError, ValueError):
                counters["errors"] += 1
                await asyncio.sleep(0.5)
            finally:
                if writer is not None:
                    writers.discard(writer)
                    writer.close()

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    loop = asyncio.get_running_loop()

    async def announce() -> None:
        await all_sent.wait()
        print("ready " + json.dumps(counters), flush=True)

    announcer = asyncio.create_task(announce())
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        word = line.strip()
        if word == "report":
            print("report " + json.dumps(counters), flush=True)
        elif word in ("quit", ""):
            break
    announcer.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- output -------------------------------------------------------------------------------------
def ratio_text(value: float) -> str:
    return "-" if value != value else f"{value:.2f}x"


def div(a: float, b: float) -> float:
    """a / b, NaN when b is 0 or NaN (a server that answered nothing has no ratio)."""
    return a / b if b and b == b else float("nan")


def evaluate(report: Report) -> None:
    checks = report.checks
    hachat = report.health.get("hachat")
    aio = report.health.get("aiohttp")
    wai = report.health.get("waitress")
    if hachat and aio:
        r = div(hachat.rps, aio.rps)
        checks.append((f"GET /health >= {TARGET_VS_AIOHTTP:.1f}x aiohttp", r >= TARGET_VS_AIOHTTP,
                       f"{ratio_text(r)} ({fmt_int(hachat.rps)} vs {fmt_int(aio.rps)} req/s)"))
        checks.append(("GET /health p99 <= aiohttp's", hachat.p99 <= aio.p99,
                       f"{fmt_ms(hachat.p99)} vs {fmt_ms(aio.p99)}"))
    if hachat and wai:
        r = div(hachat.rps, wai.rps)
        checks.append((f"GET /health >= {TARGET_VS_WAITRESS:.0f}x waitress",
                       r >= TARGET_VS_WAITRESS,
                       f"{ratio_text(r)} ({fmt_int(hachat.rps)} vs {fmt_int(wai.rps)} req/s)"))
    pg = report.posts.get("postgres")
    if pg:
        checks.append((f"POST /messages on PostgreSQL >= {TARGET_PG_MSGS:,.0f} msg/s",
                       pg.rps >= TARGET_PG_MSGS, f"{fmt_int(pg.rps)} msg/s"))
    for kind, series in report.posts.items():
        n = series.notes
        checks.append((f"every acknowledged message stored ({kind})", n["durable"],
                       f"{n['acknowledged']:,} acknowledged, {n['stored_sql']:,} rows"))
    if report.lease_epochs:
        lost = {k: v for k, v in report.lease_epochs.items() if v[0] != v[1]}
        checks.append(("hachat kept its lease through every scenario (no 503s)", not lost,
                       "; ".join(f"{k}: epoch {a} -> {b}" for k, (a, b) in lost.items())
                       or "epoch unchanged"))
    idle = report.idle
    if "ratio" in idle:
        ok = idle["ratio"] >= TARGET_IDLE_RATIO and idle.get("valid", False)
        detail = (f"{100 * idle['ratio']:.0f} % ({fmt_int(idle['with'].rps)} vs "
                  f"{fmt_int(idle['none'].rps)} req/s)")
        if not idle.get("valid", False):
            detail += "; connections or waiters dropped during the runs"
        checks.append((f"GET /health with 10k open >= {100 * TARGET_IDLE_RATIO:.0f} % of none",
                       ok, detail))


def render(report: Report) -> str:
    o = report.options
    lines: list[str] = []
    add = lines.append
    pin = (f"server on CPU {sorted(o.server_cpus)[0]}, wrk on CPU {sorted(o.load_cpus)[0]}"
           if o.server_cpus else "NOT pinned (fewer than 2 CPUs)")
    add("")
    add("=" * 110)
    add(f"hachat HTTP benchmark: wrk -t1 -c{o.connections} -d{o.duration:g}s --latency, "
        f"median of {o.runs} run(s), {pin}")
    busy = ", ".join(f"CPU {c} {b:.0f} %" for c, b in sorted(report.busy_before.items()))
    add(f"before the start: {busy} busy with other work; load average (1 min) "
        f"{report.load_start[0]:.1f} at the start, {(report.load_end or report.load_start)[0]:.1f}"
        " at the end.")
    add("CPU = share of its core the server got during the runs: well under 100 % on a "
        "throughput run means something else ran on that core and req/s is understated.")
    add("=" * 110)
    # Columns: median req/s, p50, p99, failed requests (socket errors + non-2xx), the share
    # of one core the server used, requests per server CPU-second, then the ratio(s).
    head = (f"{'req/s':>9}{'p50':>10}{'p99':>10}{'fails':>7}{'CPU':>6}{'req/CPU-s':>11}")

    def cells(s: Series) -> str:
        return (f"{fmt_int(s.rps):>9}{fmt_ms(s.p50):>10}{fmt_ms(s.p99):>10}"
                f"{s.errors + s.non_2xx:>7}{100 * s.cpu_share:>5.0f}%"
                f"{fmt_int(s.per_cpu_second):>11}")

    if report.health:
        hachat = report.health.get("hachat")
        add(f"{'GET /health':<38}{head}{'hachat/peer':>13}{'per CPU-s':>11}")
        for name, s in report.health.items():
            ratio = per_cpu = ""
            if hachat and name != "hachat":
                ratio = ratio_text(div(hachat.rps, s.rps))
                per_cpu = ratio_text(div(hachat.per_cpu_second, s.per_cpu_second))
            add(f"{LABELS[name]:<38}{cells(s)}{ratio:>13}{per_cpu:>11}")
        add("")
    if report.posts:
        add(f"{'POST /messages (hachat, valid token)':<38}{head}{'acked':>9}{'stored':>9}"
            f"{'CPU/msg':>10}")
        for kind, s in report.posts.items():
            n = s.notes
            label = "  on " + ("PostgreSQL" if kind == "postgres" else "SQLite")
            cpu_ms = div(1000.0, s.per_cpu_second)
            add(f"{label:<38}{cells(s)}{n['acknowledged']:>9,}{n['stored_sql']:>9,}"
                f"{fmt_ms(cpu_ms):>10}")
        add("")
    idle = report.idle
    if "none" in idle:
        add(f"{'GET /health on hachat':<38}{head}{'ratio':>13}{'per CPU-s':>11}")
        for key, label in (("none", "  nothing else open (before+after)"),
                           ("with", f"  {idle['idle_connections']:,} idle + "
                                    f"{idle['long_polls']:,} long-polls")):
            s = idle.get(key)
            if s is None:
                continue
            ratio = per_cpu = ""
            if key == "with" and "ratio" in idle:
                ratio = f"{100 * idle['ratio']:.0f} %"
                per_cpu = f"{100 * div(s.per_cpu_second, idle['none'].per_cpu_second):.0f} %"
            add(f"{label:<38}{cells(s)}{ratio:>13}{per_cpu:>11}")
        add("")
    if report.checks:
        add("Targets (issue 6) and checks:")
        for title, ok, detail in report.checks:
            add(f"  {'PASS' if ok else 'FAIL'}  {title:<52} {detail}")
    for problem in report.problems:
        add(f"  PROBLEM  {problem}")
    for tag, prof in report.profiles.items():
        add("")
        system = prof.get("system_share")
        add(f"py-spy --gil, hachat {tag} ({fmt_int(prof.get('rps_under_profiler_raw', 0))} "
            f"req/s under the profiler; server CPU {prof.get('cpu_ms_per_request')} ms a "
            f"request, {'?' if system is None else f'{100 * system:.0f}'} % of it in the "
            f"kernel; {prof.get('samples', 0)} samples); flame graph "
            f"{prof.get('flamegraph', '')}")
        if "error" in prof:
            add(f"  {prof['error']}")
        add("  threads: " + ", ".join(f"{n} {p:.0f} %" for n, p in prof.get("threads", [])[:4]))
        for name, pct in prof.get("self_lines", [])[:8]:
            add(f"  self {pct:5.1f} %  {name}")
        for name, pct in prof.get("total", [])[:8]:
            add(f"  total {pct:4.0f} %  {name}")
    return "\n".join(lines)


def figures(report: Report) -> str:
    o = report.options
    when = dt.datetime.fromtimestamp(report.started, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    lines = ["```", f"http_bench {when} UTC, {os.cpu_count()} CPUs "
             f"({platform.python_implementation()} {platform.python_version()}), "
             f"wrk -t1 -c{o.connections} -d{o.duration:g}s, median of {o.runs}, "
             f"server CPU 0 / wrk CPU 1, load avg {report.load_start[0]:.1f}->"
             f"{(report.load_end or report.load_start)[0]:.1f}, CPU busy before start "
             + "/".join(f"{b:.0f}%" for _, b in sorted(report.busy_before.items()))]
    hachat = report.health.get("hachat")
    if report.health:
        parts = []
        for name, s in report.health.items():
            ratio = ""
            if hachat and name != "hachat":
                ratio = f" [{ratio_text(div(hachat.rps, s.rps))}]"
            parts.append(f"{name} {fmt_int(s.rps)} req/s p99 {fmt_ms(s.p99)} "
                         f"(CPU {100 * s.cpu_share:.0f}%){ratio}")
        lines.append("GET /health: " + "; ".join(parts))
        if hachat:
            lines.append("  per server CPU-second (noise check): " + "; ".join(
                f"{name} {fmt_int(s.per_cpu_second)}"
                + (f" [{ratio_text(div(hachat.per_cpu_second, s.per_cpu_second))}]"
                   if name != "hachat" else "")
                for name, s in report.health.items()))
    for kind, s in report.posts.items():
        n = s.notes
        cpu_ms = div(1000.0, s.per_cpu_second)
        lines.append(f"POST /messages {kind}: {fmt_int(s.rps)} msg/s p99 {fmt_ms(s.p99)}, "
                     f"server CPU {fmt_ms(cpu_ms)}/msg; "
                     f"acknowledged {n['acknowledged']:,}, stored {n['stored_sql']:,} "
                     f"({'durable' if n['durable'] else 'LOST MESSAGES'})")
    idle = report.idle
    if "ratio" in idle:
        lines.append(f"GET /health with {idle['idle_connections']:,} idle + "
                     f"{idle['long_polls']:,} long-polls: {fmt_int(idle['with'].rps)} req/s vs "
                     f"{fmt_int(idle['none'].rps)} with none = {100 * idle['ratio']:.0f} %")
    if report.checks:
        lines.append("targets: " + "; ".join(
            f"{'PASS' if ok else 'FAIL'} {title}" for title, ok, _ in report.checks))
    lines.append("```")
    return "\n".join(lines)


def to_json(report: Report) -> dict[str, Any]:
    o = report.options

    def plain(value: Any) -> Any:
        if isinstance(value, Series):
            return value.as_dict()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (set, tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return {
        "started": dt.datetime.fromtimestamp(report.started, dt.timezone.utc).isoformat(),
        "machine": {"cpus": os.cpu_count(), "affinity": available_cpus(),
                    "python": platform.python_version(), "platform": platform.platform()},
        "options": plain({k: v for k, v in vars(o).items()}),
        "health": plain(report.health),
        "post_messages": plain(report.posts),
        "idle": plain(report.idle),
        "load_average": {"start": report.load_start, "end": report.load_end},
        "lease_epochs": report.lease_epochs,
        "cpu_busy_before_start_percent": report.busy_before,
        "targets": [{"target": t, "pass": ok, "detail": d} for t, ok, d in report.checks],
        "profiles": report.profiles,
        "problems": report.problems,
    }


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    opts.server_cpus, opts.load_cpus = pinning_plan()
    raise_nofile_limit()
    ensure_wrk()
    if opts.server_cpus is None:
        say("warning: fewer than 2 CPUs available; server and wrk share the CPU(s)")
    report = Report(opts)
    report.busy_before = cpu_busy_percent(1.0)
    busy = ", ".join(f"CPU {c} {b:.0f} %" for c, b in sorted(report.busy_before.items()))
    say(f"before starting, with nothing of ours running: {busy} busy; "
        f"load average {report.load_start[0]:.1f}")
    if max(report.busy_before.values(), default=0) > 20:
        say("warning: the machine is busy with other work; expect noisy figures")
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        if opts.keep:
            workdir = Path(tempfile.mkdtemp(prefix="hachat-http-bench-"))
            say(f"scratch directory (kept): {workdir}")
        else:
            workdir = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="hachat-http-bench-")))
        try:
            if opts.servers:
                bench_health(opts, report, workdir)
            if opts.post:
                say(f"\n== POST /messages on hachat: wrk -t1 -c{opts.connections} "
                    f"-d{opts.duration:g}s with a Lua script, {opts.runs} run(s) ==")
                bench_post(opts, report, workdir, "sqlite")
                if opts.postgres:
                    bench_post(opts, report, workdir, "postgres")
            if opts.idle and (opts.idle_count or opts.poll_count):
                bench_idle(opts, report, workdir)
        except KeyboardInterrupt:
            report.problems.append("interrupted")
    report.load_end = os.getloadavg()
    evaluate(report)
    say(render(report))
    say("\nfigures (paste into the issue note):")
    say(figures(report))
    say(f"(total time {time.monotonic() - t0:.0f} s)")
    if opts.json_path:
        opts.json_path.write_text(json.dumps(to_json(report), indent=2, default=str))
        say(f"results written to {opts.json_path}")
    if report.problems:
        return 1
    if opts.strict and any(ok is False for _, ok, _ in report.checks):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
