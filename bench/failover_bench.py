"""Failover benchmark: kill -9 of the active node, again and again, under a continuous writer.

    python -m bench.failover_bench                 # SQLite, 50 failovers, 60 s of pauses
    python -m bench.failover_bench --pg            # the same on a fresh PostgreSQL database
    python -m bench.failover_bench --quick         # CI smoke run: 3 failovers, 10 s of pauses

A pair is started with the default failover settings (no HEALTH_* / LEASE_* variables): node A
active, node B passive, each naming the other as PEER_URL, one shared database.

- A writer thread posts messages back to back, each with its own Idempotency-Key, retrying the
  same key until it is acknowledged; it follows the `active` URL of a 503 `not_active` answer
  and switches node on connection errors.
- Each failover: kill -9 the active node; unavailability = from the writer's first failed write
  to its first acknowledged write after it; restart the killed node (it comes back passive),
  wait until it answers /health, let writes flow for a second.
- At the end every stored message is read back (GET /messages pages): acknowledged writes lost,
  duplicates (one idempotency key stored twice), and split brain, counted two ways: (i) epochs
  must never decrease in message id order; (ii) a poller thread per node reads /health every
  50 ms; two answers saying active=true whose request/answer intervals overlap count.
- No false failover: with the writer running, the active node is SIGSTOPped for 0.5 s every
  2 s; any change of which node is active, or of the epoch, counts (seen by the pollers), and
  so does any role transition either node logs. Write stalls are reported.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    KeepAliveHTTP,
    NodeProc,
    create_pg_database,
    drop_pg_database,
    format_table,
    free_port,
    nearest_rank_percentile,
    pg_url,
    request_url,
    source_revision,
    verdict,
)

ADMIN_TOKEN = "bench-admin-" + os.urandom(6).hex()
TARGETS = {"p50": 2.0, "max": 3.5}
# Variables that would override the default failover settings: removed from the nodes' env.
FAILOVER_SETTINGS = ("HEALTH_INTERVAL", "HEALTH_TIMEOUT", "HEALTH_FAILURES", "LEASE_TTL",
                     "LEASE_RENEW_INTERVAL")


def log(text: str) -> None:
    print(text, flush=True)


# ============================================================================================
# The writer
# ============================================================================================

@dataclass
class Ack:
    key: str
    message_id: int
    epoch: int
    node: int
    sent: float  # monotonic time the acknowledged attempt was sent
    acked: float  # ... and answered


@dataclass
class Outage:
    """Consecutive failed attempts, closed by the next acknowledged write."""

    first_fail: float  # when the first failed attempt failed
    first_fail_sent: float  # when that attempt was sent
    end: float = 0.0  # when the next write was acknowledged
    attempts: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.first_fail


class Writer(threading.Thread):
    """Posts messages back to back to whichever node accepts them."""

    def __init__(self, urls: list[str], token: str, group_id: int, run_id: str,
                 timeout: float = 3.0, pause: float = 0.01) -> None:
        super().__init__(name="writer", daemon=True)
        self.urls = urls
        self.index_of = {u: i for i, u in enumerate(urls)}
        self.clients = [KeepAliveHTTP(u, timeout=timeout) for u in urls]
        self.token = token
        self.group_id = group_id
        self.run_id = run_id
        self.pause = pause
        self.acks: list[Ack] = []
        self.outages: list[Outage] = []
        self.current: Outage | None = None
        self.failed_attempts = 0
        self.last_ack = 0.0
        self.unacked: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(60)

    def run(self) -> None:
        n = 0
        node = 0
        while not self._halt.is_set():
            n += 1
            key = f"{self.run_id}-{n}"
            body = {"groupId": self.group_id, "content": f"message {n}"}
            tries = 0
            while True:
                tries += 1
                sent = time.monotonic()
                kind = ""
                try:
                    reply = self.clients[node].request(
                        "POST", "/messages", body, token=self.token,
                        headers={"Idempotency-Key": key})
                except (OSError, http.client.HTTPException) as exc:
                    reply = None
                    kind = type(exc).__name__
                now = time.monotonic()
                if reply is not None and reply.status in (200, 201):
                    doc = reply.json()
                    self.acks.append(Ack(key, doc["id"], doc["epoch"], node, sent, now))
                    self.last_ack = now
                    if self.current is not None:
                        self.current.end = now
                        self.outages.append(self.current)
                        self.current = None
                    break
                self.failed_attempts += 1
                if self.current is None:
                    self.current = Outage(first_fail=now, first_fail_sent=sent)
                self.current.attempts += 1
                if reply is None:
                    node = 1 - node
                else:
                    doc = reply.json() or {}
                    kind = f"{reply.status} {doc.get('error', '')}".strip()
                    if reply.status == 503 and doc.get("error") == "not_active":
                        active = doc.get("active")
                        node = self.index_of.get(active, 1 - node) if active else 1 - node
                self.current.kinds[kind] = self.current.kinds.get(kind, 0) + 1
                if self._halt.is_set() and tries > 3000:  # ~30 s: give up on this one
                    self.unacked.append(key)
                    break
                time.sleep(self.pause)
        for c in self.clients:
            c.close()


# ============================================================================================
# /health pollers
# ============================================================================================

@dataclass
class Sample:
    sent: float
    answered: float
    active: bool | None  # None: no answer
    epoch: int | None
    role: str | None


class HealthPoller(threading.Thread):
    """GET /health on one node every `interval` seconds (fresh connection, short timeout)."""

    def __init__(self, node: NodeProc, interval: float = 0.05, timeout: float = 0.3) -> None:
        super().__init__(name=f"health-{node.name}", daemon=True)
        self.node = node
        self.interval = interval
        self.timeout = timeout
        self.samples: list[Sample] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def run(self) -> None:
        next_tick = time.monotonic()
        while not self._halt.is_set():
            sent = time.monotonic()
            h = self.node.health(timeout=self.timeout)
            answered = time.monotonic()
            if h is None:
                self.samples.append(Sample(sent, answered, None, None, None))
            else:
                self.samples.append(Sample(sent, answered, bool(h.get("active")),
                                           h.get("epoch"), h.get("role")))
            next_tick += self.interval
            delay = next_tick - time.monotonic()
            if delay > 0:
                self._halt.wait(delay)
            else:
                next_tick = time.monotonic()


def both_active(a: list[Sample], b: list[Sample], since: float = 0.0,
                until: float = float("inf")) -> list[tuple[Sample, Sample]]:
    """Pairs of active=true answers, one from each node, whose intervals overlap."""
    xs = [s for s in a if s.active and since <= s.sent <= until]
    ys = [s for s in b if s.active and since <= s.sent <= until]
    out = []
    j = 0
    for x in xs:  # both lists are in time order
        while j < len(ys) and ys[j].answered < x.sent:
            j += 1
        k = j
        while k < len(ys) and ys[k].sent <= x.answered:
            out.append((x, ys[k]))
            k += 1
    return out


def windows(pairs: list[tuple[Sample, Sample]], gap: float = 0.2) -> int:
    """How many separate windows the overlapping pairs form (pairs closer than `gap` join)."""
    count = 0
    last = -1e9
    for x, _y in pairs:
        if x.sent - last > gap:
            count += 1
        last = x.answered
    return count


def role_changes(pollers: list[HealthPoller], since: float, until: float) -> list[str]:
    """Changes of (which node reports active, highest epoch reported) between since and until,
    as seen by the pollers. The state at `since` is the baseline."""
    merged = sorted(((s, p.node.name) for p in pollers for s in p.samples
                     if since <= s.sent <= until and s.active is not None),
                    key=lambda t: t[0].answered)
    changes = []
    active: str | None = None
    epoch: int | None = None
    for s, name in merged:
        if s.epoch is not None:
            if epoch is not None and s.epoch != epoch:
                changes.append(f"{s.answered - since:.2f}s: {name} reports epoch {s.epoch} "
                               f"(was {epoch})")
            epoch = s.epoch if epoch is None else max(epoch, s.epoch)
        if s.active:
            if active is not None and name != active:
                changes.append(f"{s.answered - since:.2f}s: {name} reports active "
                               f"(was {active})")
            active = name
    return changes


# ============================================================================================
# The benchmark
# ============================================================================================

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[tuple] = []
        self.pause_rows: list[tuple] = []
        self.figures: dict[str, Any] = {}

    # -- set-up --------------------------------------------------------------------------
    def seed(self, url: str) -> tuple[str, int]:
        """One writer account with a token and one group, through the store layer."""
        from argon2 import PasswordHasher

        from hachat.store import accounts, chat
        from hachat.store.db import Database

        db = Database(url)
        try:
            db.upgrade()
            with db.write() as s:
                user = accounts.create_user(s, "writer", PasswordHasher().hash("writer pass 1"))
                token = accounts.issue_token(s, user.id)
                group = chat.create_group(s, "failover", user.id, []).id
        finally:
            db.dispose()
        return token, group

    def make_pair(self, url: str, workdir: Path) -> tuple[NodeProc, NodeProc]:
        ports = (free_port(), free_port())
        while ports[0] == ports[1]:
            ports = (ports[0], free_port())
        nodes = []
        for name, port, peer, active in (("node-a", ports[0], ports[1], "true"),
                                         ("node-b", ports[1], ports[0], "false")):
            node = NodeProc(name, {"DATABASE_URL": url, "IS_ACTIVE": active,
                                   "PEER_URL": f"http://127.0.0.1:{peer}",
                                   "ADMIN_TOKEN": ADMIN_TOKEN, "LOG_LEVEL": "INFO"},
                            workdir, port=port)
            for key in FAILOVER_SETTINGS:  # the defaults, whatever our environment says
                node.env.pop(key, None)
            nodes.append(node)
        return nodes[0], nodes[1]

    def active_node(self, timeout: float = 15.0) -> tuple[NodeProc, dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = [(n, h) for n in self.nodes if (h := n.health(0.5)) and h.get("active")]
            if len(found) == 1:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no single active node: "
                                   f"{[n.health(0.5) for n in self.nodes]}")
            time.sleep(0.05)

    def wait_for_outage_after(self, t: float, timeout: float) -> Outage:
        """The writer's first outage that began (a write failed) after `t`, once it is over
        (a write was acknowledged again)."""
        deadline = time.monotonic() + timeout
        while True:
            for o in self.writer.outages:
                if o.first_fail >= t:
                    return o
            if time.monotonic() > deadline:
                raise TimeoutError(f"writes not failing and back within {timeout} s after the "
                                   f"kill; health: {[n.health(0.5) for n in self.nodes]}")
            time.sleep(0.005)

    # -- phases ------------------------------------------------------------------------------
    def failovers(self, count: int) -> None:
        log(f"{count} kill -9 failovers ...")
        records = []
        time.sleep(1.0)
        for i in range(count):
            victim, h = self.active_node()
            survivor = self.nodes[1 - self.nodes.index(victim)]
            old_epoch = h.get("epoch")
            killed_at = time.monotonic()
            victim.kill()
            outage = self.wait_for_outage_after(killed_at, 30.0)
            back = outage.end
            new_active, h2 = self.active_node()
            victim.start()
            restarted = time.monotonic()
            victim.wait_health(timeout=60)
            healthy = time.monotonic()
            records.append({"i": i + 1, "killed": victim.name, "killed_at": killed_at,
                            "outage": outage, "first_ack_after": back, "old_epoch": old_epoch,
                            "new_active": new_active.name, "new_epoch": h2.get("epoch"),
                            "restart_to_health_s": round(healthy - restarted, 3)})
            if new_active is not survivor:
                log(f"    failover {i + 1}: unexpected active {new_active.name}")
            time.sleep(1.0)  # writes flow before the next kill
            log(f"    failover {i + 1:>2}: killed {victim.name} (epoch {old_epoch}) -> "
                f"{new_active.name} epoch {h2.get('epoch')}; unavailable "
                f"{outage.seconds:.2f} s (kill -> ack {back - killed_at:.2f} s, "
                f"{outage.attempts} failed attempts); restart -> healthy "
                f"{healthy - restarted:.1f} s")
        self.failover_records = records

    def pauses(self, seconds: float) -> None:
        """SIGSTOP the active node for 0.5 s every 2 s, `seconds` long, under the writer."""
        log(f"no false failover: SIGSTOP the active for 0.5 s every 2 s for {seconds:g} s ...")
        victim, h = self.active_node()
        log_sizes = {n.name: n.log_path.stat().st_size for n in self.nodes}
        acks_before = len(self.writer.acks)
        outages_before = len(self.writer.outages)
        failed_before = self.writer.failed_attempts
        start = time.monotonic()
        stops = 0
        while time.monotonic() - start < seconds:
            cycle = time.monotonic()
            victim.send(signal.SIGSTOP)
            stops += 1
            time.sleep(0.5)
            victim.send(signal.SIGCONT)
            left = 2.0 - (time.monotonic() - cycle)
            if left > 0:
                time.sleep(left)
        time.sleep(3.0)  # anything that would follow the last pause
        end = time.monotonic()
        changes = role_changes(self.pollers, start - 0.5, end)
        logged = []
        for n in self.nodes:
            with open(n.log_path, "rb") as f:
                f.seek(log_sizes[n.name])
                text = f.read().decode(errors="replace")
            logged += [f"{n.name}: {ln}" for ln in text.splitlines() if " role " in ln
                       and " -> " in ln]
        acks = self.writer.acks[acks_before:]
        outages = self.writer.outages[outages_before:]
        failed = self.writer.failed_attempts - failed_before
        latencies = [a.acked - a.sent for a in acks]
        stall = max(latencies) if latencies else float("nan")
        gaps = [b.acked - a.acked for a, b in zip(acks, acks[1:], strict=False)]
        max_gap = max(gaps) if gaps else float("nan")
        both = both_active(self.pollers[0].samples, self.pollers[1].samples, start, end)
        self.figures["pauses"] = {
            "seconds": seconds, "stops": stops, "paused_node": victim.name,
            "epoch": h.get("epoch"), "role_changes_seen": changes, "role_changes_logged": logged,
            "writes_acked": len(acks), "failed_attempts": failed,
            "outages": [{"seconds": o.seconds, "attempts": o.attempts, "kinds": o.kinds}
                        for o in outages],
            "max_write_latency_s": stall, "max_gap_between_acks_s": max_gap,
            "p50_write_latency_ms": nearest_rank_percentile(latencies, 50) * 1000,
            "p99_write_latency_ms": nearest_rank_percentile(latencies, 99) * 1000,
            "both_active_samples": len(both)}
        log(f"    {stops} pauses of {victim.name}; {len(acks)} writes acknowledged, {failed} "
            f"failed attempts; longest write {stall:.2f} s, longest gap between acks "
            f"{max_gap:.2f} s; role changes seen {len(changes)}, logged {len(logged)}")
        for line in (changes + logged)[:6]:
            log(f"    {line}")
        n_changes = len(changes) + len(logged)
        self.pause_rows.append((f"no false failover: role/epoch changes ({stops} pauses)",
                          f"{len(changes)} seen, {len(logged)} logged", "0",
                          verdict(n_changes == 0)))
        self.pause_rows.append(("  writes during pauses: acked / failed attempts",
                          f"{len(acks)} / {failed}", "(info)", ""))
        self.pause_rows.append(("  write stall: longest write / longest gap",
                          f"{stall:.2f} s / {max_gap:.2f} s", "(info)", ""))

    def verify(self) -> None:
        """Read every stored message back and compare with the acknowledgments."""
        active, _ = self.active_node()
        stored: list[dict] = []
        before = None
        while True:
            q = f"/messages?groupId={self.group}&limit=200"
            if before is not None:
                q += f"&before={before}"
            reply = request_url(active.url, "GET", q, token=self.token, timeout=30)
            if reply.status != 200:
                raise RuntimeError(f"GET {q} answered {reply.status}: {reply.body[:200]!r}")
            doc = reply.json()
            stored.extend(doc["messages"])
            before = doc["nextBefore"]
            if before is None:
                break
        stored.reverse()  # oldest first
        by_key: dict[str, list[dict]] = {}
        for m in stored:
            by_key.setdefault(m.get("clientMessageId"), []).append(m)
        acks = self.writer.acks
        lost = [a for a in acks if a.key not in by_key]
        dups = {k: v for k, v in by_key.items() if len(v) > 1}
        mismatched = [a for a in acks if a.key in by_key
                      and (by_key[a.key][0]["id"] != a.message_id
                           or by_key[a.key][0]["epoch"] != a.epoch)]
        ids = [m["id"] for m in stored]
        epoch_violations = sum(1 for x, y in zip(stored, stored[1:], strict=False)
                               if y["epoch"] < x["epoch"])
        self.figures["verify"] = {
            "stored": len(stored), "acked": len(acks), "lost": len(lost),
            "duplicates": len(dups), "mismatched": len(mismatched),
            "epoch_violations": epoch_violations, "ids_sorted": ids == sorted(ids),
            "unacked_at_stop": len(self.writer.unacked),
            "lost_sample": [a.key for a in lost[:5]],
            "dup_sample": list(dups)[:5],
            "epochs": sorted({m["epoch"] for m in stored})}
        self.stored = stored
        self.lost, self.dups, self.mismatched = lost, dups, mismatched
        self.epoch_violations = epoch_violations

    # -- the whole run -------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        workdir = Path(tempfile.mkdtemp(prefix="hachat-failover-bench-"))
        pg_name = None
        if a.pg:
            pg_name = create_pg_database("hachat_bench_failover")
            url = pg_url(pg_name)
        else:
            url = f"sqlite:///{workdir / 'hachat.db'}"
        self.db_label = "PostgreSQL" if a.pg else "SQLite"
        log(f"database {url}; logs in {workdir}")
        self.nodes: list[NodeProc] = []
        self.pollers: list[HealthPoller] = []
        self.writer: Writer | None = None
        started = time.monotonic()
        try:
            self.token, self.group = self.seed(url)
            node_a, node_b = self.make_pair(url, workdir)
            self.nodes = [node_a, node_b]
            node_a.start()
            node_a.wait_health(timeout=60, active=True)
            node_b.start()
            node_b.wait_health(timeout=60)
            self.pollers = [HealthPoller(n) for n in self.nodes]
            for p in self.pollers:
                p.start()
            self.writer = Writer([n.url for n in self.nodes], self.token, self.group,
                                 run_id=f"fo{os.getpid()}")
            self.writer.start()
            phase_start = time.monotonic()
            self.failovers(a.failovers)
            failover_end = time.monotonic()
            self.pauses(a.pause_seconds)
            self.writer.stop()
            for p in self.pollers:
                p.stop()
            self.verify()
            self.report(phase_start, failover_end)
        finally:
            for n in self.nodes:  # first, so that nothing is left running whatever happens
                try:
                    n.stop()
                except Exception as exc:  # noqa: BLE001
                    log(f"could not stop {n.name}: {exc}")
            if self.writer is not None and self.writer.is_alive():
                self.writer.stop()
            for p in self.pollers:
                p.stop()
            if pg_name:
                try:
                    drop_pg_database(pg_name)
                except Exception as exc:  # noqa: BLE001 - report, do not hide the result
                    log(f"could not drop database {pg_name}: {exc}")
            if a.keep:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        self.figures["elapsed_s"] = round(time.monotonic() - started, 1)
        title = (f"hachat failover benchmark ({'quick' if a.quick else 'full'}): "
                 f"{self.db_label}, {a.failovers} kill -9 failovers, default settings, "
                 f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, "
                 f"{self.figures['elapsed_s']:.0f} s, src {source_revision()}")
        print(title)
        print(format_table(("measure", "value", "target", "verdict"), self.rows))
        if a.json:
            Path(a.json).write_text(json.dumps(
                {"title": title, "params": {k: v for k, v in vars(a).items()},
                 "figures": self.figures,
                 "failovers": [{k: v for k, v in r.items() if k != "outage"}
                               for r in getattr(self, "failover_records", [])],
                 "rows": self.rows}, indent=2, default=str))
        return 1 if any(r[3] == "FAIL" for r in self.rows) else 0

    def report(self, phase_start: float, failover_end: float) -> None:
        w = self.writer
        assert w is not None
        matched = [r["outage"] for r in self.failover_records]
        unavail = [o.seconds for o in matched]
        kill_to_ack = [r["first_ack_after"] - r["killed_at"] for r in self.failover_records]
        other = [o for o in w.outages if all(o is not m for m in matched)
                 and phase_start <= o.first_fail < failover_end]
        p50 = nearest_rank_percentile(unavail, 50)
        p99 = nearest_rank_percentile(unavail, 99)
        worst = max(unavail) if unavail else float("nan")
        both = both_active(self.pollers[0].samples, self.pollers[1].samples)
        n_samples = min(len(p.samples) for p in self.pollers)
        self.figures["failovers"] = {
            "unavailability_s": [round(u, 3) for u in unavail],
            "kill_to_first_ack_s": [round(u, 3) for u in kill_to_ack],
            "other_outages": [{"seconds": round(o.seconds, 3), "attempts": o.attempts,
                               "kinds": o.kinds} for o in other],
            "health_samples_per_node": n_samples, "both_active_samples": len(both),
            "both_active_windows": windows(both)}
        n = len(self.failover_records)
        self.rows += [
            (f"unavailability p50 (first failed -> first acked write, n={len(unavail)})",
             f"{p50:.2f} s", f"<= {TARGETS['p50']:g} s",
             verdict(p50 <= TARGETS["p50"] and len(unavail) == n)),
            ("unavailability p99", f"{p99:.2f} s", "(info)", ""),
            ("unavailability max", f"{worst:.2f} s", f"<= {TARGETS['max']:g} s",
             verdict(worst <= TARGETS["max"])),
            ("  kill -9 -> first acked write p50 / max",
             f"{statistics.median(kill_to_ack):.2f} s / {max(kill_to_ack):.2f} s", "(info)",
             ""),
            ("  other outages during the failover phase",
             f"{len(other)}" + (f" (longest {max(o.seconds for o in other):.2f} s)"
                                if other else ""), "(info)", ""),
            ("acknowledged writes (stored messages)",
             f"{len(w.acks)} ({len(self.stored)})", "", ""),
            ("acknowledged writes lost", len(self.lost), "0", verdict(not self.lost)),
            ("duplicates (one idempotency key stored twice)", len(self.dups), "0",
             verdict(not self.dups)),
            ("acks whose stored id/epoch differ", len(self.mismatched), "0",
             verdict(not self.mismatched)),
            ("split brain (i): epoch decreases in id order", self.epoch_violations, "0",
             verdict(self.epoch_violations == 0)),
            (f"split brain (ii): both /health active (of ~{n_samples} samples/node)",
             f"{len(both)} samples, {windows(both)} windows", "0", verdict(not both)),
        ]
        self.rows += self.pause_rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.failover_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 failovers and 10 s of pauses")
    p.add_argument("--pg", action="store_true",
                   help="a fresh PostgreSQL database on 127.0.0.1:5432 (user postgres) "
                        "instead of SQLite; dropped at the end")
    p.add_argument("--failovers", type=int, help="kill -9 failovers (default 50)")
    p.add_argument("--pause-seconds", type=float,
                   help="how long to keep pausing the active node (default 60)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = p.parse_args(argv)
    if args.failovers is None:
        args.failovers = 3 if args.quick else 50
    if args.pause_seconds is None:
        args.pause_seconds = 10.0 if args.quick else 60.0
    return args


def main(argv: list[str] | None = None) -> int:
    return Bench(parse_args(argv)).run()


if __name__ == "__main__":
    raise SystemExit(main())
