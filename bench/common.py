"""Helpers shared by the benchmarks: processes pinned to a CPU, free ports, HTTP calls, wrk,
PostgreSQL scratch databases, medians.

Shared file: several benchmarks use it, so add functions rather than change existing ones.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# -- ports, CPUs, limits ------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel calls free right now: bind to port 0, read it, release it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pinning_plan() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, load-generator CPUs): CPU 0 and CPU 1 when both are usable, else no pinning."""
    cpus = available_cpus()
    if 0 in cpus and 1 in cpus:
        return {0}, {1}
    if len(cpus) >= 2:
        return {cpus[0]}, {cpus[1]}
    return None, None


def raise_nofile_limit(wanted: int | None = None) -> int:
    """Raise this process's soft RLIMIT_NOFILE toward `wanted` (default: the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def child_setup(cpus: set[int] | None = None, nofile: bool = True) -> Callable[[], None]:
    """A `preexec_fn`: pin the child to `cpus` and raise its open-file limit."""

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if nofile:
            raise_nofile_limit()

    return setup


# -- processes ----------------------------------------------------------------------------------
class ManagedProcess:
    """A child process we started: output to a log file, stopped by its own pid only."""

    def __init__(self, name: str, argv: list[str], *, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, log_path: str | Path | None = None,
                 cpus: set[int] | None = None, stdin: Any = subprocess.DEVNULL,
                 capture_stdout: bool = False) -> None:
        self.name = name
        self.argv = argv
        self.log_path = Path(log_path) if log_path else None
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, env=dict(env) if env is not None else None, cwd=cwd, stdin=stdin,
            stdout=subprocess.PIPE if capture_stdout else self._log, stderr=self._log,
            preexec_fn=child_setup(cpus), text=capture_stdout or None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL: only this child, by its pid."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# -- HTTP -------------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def http_call(port: int, method: str, path: str, body: Any = None, *, token: str | None = None,
              host: str = "127.0.0.1", timeout: float = 10.0) -> Reply:
    """One request on a fresh connection; `body` is sent as JSON when not None."""
    headers = {"Connection": "close"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


def wait_until_serving(port: int, path: str = "/health", *, timeout: float = 30.0,
                       check: Callable[[Reply], bool] | None = None,
                       process: ManagedProcess | None = None) -> Reply:
    """Poll `path` until it answers 200 (and `check` agrees); fail early if `process` died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.proc.returncode}:\n"
                               f"{process.log_tail()}")
        try:
            reply = http_call(port, "GET", path, timeout=2.0)
            last = reply
            if reply.status == 200 and (check is None or check(reply)):
                return reply
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    tail = process.log_tail() if process is not None else ""
    raise RuntimeError(f"nothing served {path} on port {port} within {timeout:.0f} s "
                       f"(last: {last!r})\n{tail}")


def start_hachat(workdir: Path, *, port: int | None = None, database_url: str | None = None,
                 env: Mapping[str, str] | None = None, cpus: set[int] | None = None,
                 name: str = "hachat", timeout: float = 60.0) -> tuple[ManagedProcess, int]:
    """Start `python -m hachat serve` as a lone active node in `workdir` (no .env is read from
    the repository); wait until /health says active. Returns (process, port)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    full = dict(os.environ)
    full.update({
        "PORT": str(port), "HOST": "127.0.0.1", "IS_ACTIVE": "true", "PEER_URL": "",
        "LOG_LEVEL": "WARNING", "NODE_ID": f"{name}-{port}",
        "DATABASE_URL": database_url or f"sqlite:///{workdir / 'hachat.db'}",
    })
    full.update(env or {})
    proc = ManagedProcess(name, [sys.executable, "-m", "hachat", "serve"], env=full, cwd=workdir,
                          log_path=workdir / f"{name}-{port}.log", cpus=cpus)
    try:
        wait_until_serving(port, "/health", timeout=timeout, process=proc,
                           check=lambda r: bool((r.json() or {}).get("active")))
    except BaseException:
        proc.stop()
        raise
    return proc, port


# -- wrk --------------------------------------------------------------------------------------
def ensure_wrk() -> str:
    """Path of wrk; installs Debian's package when missing (apt-get update only on failure)."""
    found = shutil.which("wrk")
    if found:
        return found
    sudo = ["sudo"] if os.geteuid() != 0 and shutil.which("sudo") else []
    install = [*sudo, "apt-get", "install", "-y", "-q", "wrk"]
    print("wrk is missing: installing it from Debian's packages", flush=True)
    if subprocess.run(install, stdout=subprocess.DEVNULL).returncode != 0:
        update = [*sudo, "apt-get", "update", "-q"]
        subprocess.run(update, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, stdout=subprocess.DEVNULL, check=True)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is still missing after apt-get install wrk")
    return found


_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(number: str, unit: str) -> float:
    return float(number) * _UNIT_SECONDS[unit]


def _count(text: str) -> float:
    """wrk's counts may carry a k/M/G suffix in some places."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}
    if text and text[-1] in scale:
        return float(text[:-1]) * scale[text[-1]]
    return float(text)


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    percentiles_ms: dict[str, float]
    non_2xx: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def p50_ms(self) -> float:
        return self.percentiles_ms.get("50", float("nan"))

    @property
    def p99_ms(self) -> float:
        return self.percentiles_ms.get("99", float("nan"))

    @property
    def ok_requests(self) -> int:
        """Responses with a 2xx or 3xx status (wrk counts the others as non-2xx)."""
        return self.requests - self.non_2xx

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def as_dict(self, raw: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not raw:
            out.pop("raw")
        return out


_LAT_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(\d+(?:\.\d+)?)(us|ms|s|m|h)\s*$")
_TOTAL = re.compile(r"^\s*(\d+)\s+requests in\s+(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_RPS = re.compile(r"^Requests/sec:\s+(\d+(?:\.\d+)?[kMG]?)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")


def parse_wrk(text: str) -> WrkResult:
    """Parse `wrk --latency` output: totals, Requests/sec, the latency distribution, errors."""
    percentiles: dict[str, float] = {}
    requests, seconds, rps = 0, 0.0, None
    in_distribution = False
    for line in text.splitlines():
        if "Latency Distribution" in line:
            in_distribution = True
            continue
        if in_distribution:
            m = _LAT_LINE.match(line)
            if m:
                key = m.group(1).rstrip("0").rstrip(".") if "." in m.group(1) else m.group(1)
                percentiles[key] = _seconds(m.group(2), m.group(3)) * 1000.0
                continue
            in_distribution = False
        m = _TOTAL.match(line)
        if m:
            requests = int(m.group(1))
            seconds = _seconds(m.group(2), m.group(3))
            continue
        m = _RPS.match(line)
        if m:
            rps = _count(m.group(1))
    if rps is None:
        raise ValueError(f"no 'Requests/sec' in wrk's output:\n{text}")
    errors: dict[str, int] = {}
    m = _SOCKET.search(text)
    if m:
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()),
                          strict=True))
    m = _NON2XX.search(text)
    non_2xx = int(m.group(1)) if m else 0
    return WrkResult(requests, seconds, rps, percentiles, non_2xx, errors, text)


def run_wrk(url: str, *, duration: float, connections: int = 50, threads: int = 1,
            script: str | Path | None = None, cpus: set[int] | None = None,
            timeout_s: int | None = None, extra: Iterable[str] = ()) -> WrkResult:
    """Run `wrk --latency` (pinned to `cpus`) and parse what it prints."""
    argv = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    if timeout_s:
        argv.append(f"--timeout={timeout_s}s")
    if script:
        argv += ["-s", str(script)]
    argv += [*extra, url]
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=child_setup(cpus),
                          timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# -- PostgreSQL -------------------------------------------------------------------------------
def pg_available(admin_url: str = PG_ADMIN_URL) -> bool:
    try:
        import psycopg

        with psycopg.connect(admin_url, connect_timeout=3):
            return True
    except Exception:
        return False


def create_pg_database(prefix: str = "hachat_bench", admin_url: str = PG_ADMIN_URL) -> str:
    """Create a fresh, empty database `<prefix>_<random>`; returns its name."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str, admin_url: str = PG_ADMIN_URL) -> None:
    """Drop a database made by create_pg_database, ending its leftover sessions first."""
    import psycopg

    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"refusing to drop {name!r}")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def pg_url(name: str, host: str = "127.0.0.1", port: int = 5432, user: str = "postgres") -> str:
    return f"postgresql://{user}@{host}:{port}/{name}"


# -- numbers ----------------------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def fmt_int(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"


def fmt_ms(value: float) -> str:
    if value != value:
        return "-"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


# -- realtime and failover benchmarks: processes, RSS, percentiles, tables ----------------------
# (Imports these helpers need beyond the module's own are made inside them.)

def read_rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def read_sched_ns(pid: int) -> tuple[int, int]:
    """(on-CPU ns, runnable-but-waiting-for-a-CPU ns) summed over every thread of a process,
    from /proc/<pid>/task/*/schedstat (threads that already ended are not counted)."""
    run = wait = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                fields = f.read().split()
        except OSError:
            continue
        run += int(fields[0])
        wait += int(fields[1])
    return run, wait


def nearest_rank_percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0 < q <= 100) by the nearest-rank method: the smallest value with
    at least q% of the values at or below it. NaN for no values."""
    import math

    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(seconds: Iterable[float]) -> dict[str, float]:
    """n, p50, p99 and max (nearest rank) of durations given in seconds, in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    return {"n": len(ms), "p50": nearest_rank_percentile(ms, 50),
            "p99": nearest_rank_percentile(ms, 99), "max": max(ms) if ms else float("nan")}


def format_table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A plain-text table, columns padded to their widest cell, a dashed line under the head."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def request_url(base_url: str, method: str, path: str, body: Any = None, *,
                token: str | None = None, headers: Mapping[str, str] | None = None,
                timeout: float = 10.0) -> Reply:
    """One request to `base_url` (http://host:port) on a fresh connection; `body` is sent as
    JSON unless it is bytes. Raises OSError / http.client.HTTPException on failure."""
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data, hdrs = _request_parts(body, token, headers)
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


def _request_parts(body: Any, token: str | None,
                   headers: Mapping[str, str] | None) -> tuple[bytes | None, dict[str, str]]:
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        hdrs.setdefault("Content-Type", "application/json")
    return data, hdrs


class KeepAliveHTTP:
    """Requests over one reused connection to `base_url`, reconnecting after any failure.
    Not thread-safe: one per thread."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def connect(self) -> None:
        if self._conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                headers: Mapping[str, str] | None = None) -> Reply:
        data, hdrs = _request_parts(body, token, headers)
        for attempt in (1, 2):
            reused = self._conn is not None
            try:
                self.connect()
                assert self._conn is not None
                self._conn.request(method, path, body=data, headers=hdrs)
                resp = self._conn.getresponse()
                reply = Reply(resp.status, resp.read(),
                              {k.lower(): v for k, v in resp.getheaders()})
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.close()
                # Typically the server closed a reused idle connection (keep-alive timeout)
                # before reading this request: retry once on a fresh connection. (A request
                # that must not run twice should carry an idempotency key.)
                if not reused or attempt == 2:
                    raise
            except BaseException:
                self.close()
                raise
        if reply.headers.get("connection", "").lower() == "close":
            self.close()
        return reply

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            import contextlib

            with contextlib.suppress(OSError):
                conn.close()


class NodeProc:
    """One `python -m hachat serve` child that can be killed and started again on the same port,
    with its own environment (added to a copy of ours without DB_*/DATABASE_URL/PEER_URL/
    IS_ACTIVE) and a log file that restarts append to. RLIMIT_NOFILE is raised in the child."""

    def __init__(self, name: str, env: Mapping[str, str], workdir: Path,
                 port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("DB_") and k not in ("DATABASE_URL", "PEER_URL", "IS_ACTIVE")}
        self.env = {**base, "HOST": "127.0.0.1", "NODE_ID": name, "PUBLIC_URL": self.url,
                    "LOG_LEVEL": "INFO", **env, "PORT": str(self.port)}
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.cpus: set[int] | None = None  # pin the child to these CPUs when set

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> NodeProc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hachat", "serve"], env=self.env, cwd=self.workdir,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=child_setup(self.cpus))
        self.starts += 1
        return self

    def health(self, timeout: float = 1.0) -> dict | None:
        try:
            reply = request_url(self.url, "GET", "/health", timeout=timeout)
        except (OSError, http.client.HTTPException):
            return None
        return reply.json() if reply.status == 200 else None

    def wait_health(self, timeout: float = 30.0, active: bool | None = None) -> dict:
        """Until /health answers (and, when `active` is given, reports that)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"see {self.log_path}:\n{self.log_tail()}")
            h = self.health()
            if h is not None and (active is None or h.get("active") is active):
                return h
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not healthy (active={active}) after {timeout} s\n"
                           f"{self.log_tail()}")

    def send(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL this child (by its pid) and reap it."""
        self.send(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGCONT + SIGTERM, wait; SIGKILL if it does not end in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# -- CPU accounting (added for bench/http_bench.py) ---------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the ")" that ends the command name: field 3 (state) is fields[0], so utime (14)
    # and stime (15) are fields[11] and fields[12].
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_busy_percent(seconds: float = 1.0) -> dict[int, float]:
    """How busy each CPU was over the next `seconds` (from /proc/stat), in percent."""

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *values = line.split()
                if name.startswith("cpu") and name != "cpu":
                    ticks = [int(v) for v in values]
                    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
                    out[int(name[3:])] = (sum(ticks[:8]), idle)
        return out

    before = sample()
    time.sleep(seconds)
    after = sample()
    busy = {}
    for cpu, (total, idle) in after.items():
        t0, i0 = before.get(cpu, (total, idle))
        span = total - t0
        busy[cpu] = 100.0 * (span - (idle - i0)) / span if span > 0 else 0.0
    return busy


def process_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


def source_revision() -> str:
    """The repository's HEAD (short), with "+changes" when src/ differs from it; "?" if unknown."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+changes" if dirty else "")
