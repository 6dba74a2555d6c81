"""A real active/passive pair of processes, a writer that follows the active node, and a TCP
relay that can cut a link (between the nodes, or to the database) on demand."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from support import NodeProcess, call, free_port

FAST = {"HEALTH_INTERVAL": "0.2", "HEALTH_TIMEOUT": "0.2", "HEALTH_FAILURES": "3",
        "LEASE_TTL": "1.5", "LEASE_RENEW_INTERVAL": "0.25"}


class Relay:
    """Forwards TCP from a local port to a target. `cut()` drops every connection and refuses
    new ones (the far side sees a dead network); `heal()` restores it."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                # a black hole: hold the connection open, never answer, close later
                threading.Timer(5.0, client.close).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair) -> None:
        a, b = pair
        try:
            while self._open.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._pairs.discard(pair)
            for s in pair:
                with contextlib.suppress(OSError):
                    s.close()


class Pair:
    """Node A (starts active) and node B (passive), each naming the other as its peer, possibly
    through relays so the link between them can be cut."""

    def __init__(self, database_url: str, workdir: Path, *, relay_peers: bool = False,
                 extra: dict[str, str] | None = None) -> None:
        self.ports = (free_port(), free_port())
        self.relays: list[Relay] = []
        peer_ports = list(reversed(self.ports))
        if relay_peers:
            self.relays = [Relay(p) for p in peer_ports]
            peer_ports = [r.port for r in self.relays]
        common = {"DATABASE_URL": database_url, "ADMIN_TOKEN": "admin-secret", **FAST,
                  **(extra or {})}
        self.a = NodeProcess({**common, "PORT": str(self.ports[0]), "IS_ACTIVE": "true",
                              "PEER_URL": f"http://127.0.0.1:{peer_ports[0]}"}, workdir, "node-a")
        self.b = NodeProcess({**common, "PORT": str(self.ports[1]), "IS_ACTIVE": "false",
                              "PEER_URL": f"http://127.0.0.1:{peer_ports[1]}"}, workdir, "node-b")

    @property
    def nodes(self) -> list[NodeProcess]:
        return [self.a, self.b]

    def start(self) -> Pair:
        self.a.start()
        self.a.wait_active()
        self.b.start()
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        for r in self.relays:
            r.close()

    def health(self) -> list[dict | None]:
        out = []
        for n in self.nodes:
            try:
                out.append(call(n.url, "GET", "/health", timeout=1).json)
            except OSError:
                out.append(None)
        return out

    def active_nodes(self) -> list[NodeProcess]:
        return [n for n, h in zip(self.nodes, self.health(), strict=True) if h and h["active"]]

    def wait_one_active(self, timeout: float = 15.0, exclude: NodeProcess | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = [n for n in self.active_nodes() if n is not exclude]
            if len(active) == 1:
                return active[0]
            time.sleep(0.05)
        raise TimeoutError(f"no single active node: {self.health()}")

    def admin(self, node: NodeProcess, path: str):
        return call(node.url, "POST", path, token="admin-secret")


@dataclass
class Ack:
    client_id: str
    message_id: int
    epoch: int
    node: str
    at: float


@dataclass
class Writer:
    """Posts messages in a loop to whichever node accepts them, retrying each message with the
    same idempotency key until it is acknowledged (as a careful client does)."""

    urls: list[str]
    token: str
    group_id: int
    acks: list[Ack] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Writer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Ack]:
        self._stop.set()
        if self._thread:
            self._thread.join(30)
        return self.acks

    def _run(self) -> None:
        n = 0
        index = 0
        while not self._stop.is_set():
            n += 1
            key = f"w-{uuid.uuid4()}"
            while True:  # until acknowledged (finish the message in hand even when stopping)
                url = self.urls[index % len(self.urls)]
                try:
                    reply = call(url, "POST", "/messages",
                                 {"groupId": self.group_id, "content": f"msg {n}"},
                                 token=self.token, headers={"Idempotency-Key": key}, timeout=3)
                except OSError:
                    reply = None
                if reply is not None and reply.status in (200, 201):
                    body = reply.json
                    self.acks.append(Ack(key, body["id"], body["epoch"], url, time.monotonic()))
                    break
                self.failures += 1
                if reply is not None and reply.status == 503:
                    active = (reply.json or {}).get("active")
                    if active in self.urls:
                        index = self.urls.index(active)
                    else:
                        index += 1
                else:
                    index += 1
                time.sleep(0.02)
                if self._stop.is_set() and reply is None and self.failures > 10_000:
                    return


def stored_messages(url: str, token: str, group_id: int) -> list[dict]:
    """Every message of the group, oldest first, read through the API."""
    out: list[dict] = []
    before = None
    while True:
        q = f"/messages?groupId={group_id}&limit=200" + (f"&before={before}" if before else "")
        reply = call(url, "GET", q, token=token)
        assert reply.status == 200, reply.raw
        out.extend(reply.json["messages"])
        before = reply.json["nextBefore"]
        if before is None:
            return list(reversed(out))


def check_no_loss_no_dup_no_split(acks: list[Ack], stored: list[dict]) -> None:
    """Every acknowledged message stored exactly once; epochs never go back in commit order."""
    by_key: dict[str, list[dict]] = {}
    for m in stored:
        by_key.setdefault(m["clientMessageId"], []).append(m)
    lost = [a for a in acks if a.client_id not in by_key]
    dups = {k: v for k, v in by_key.items() if len(v) > 1}
    assert not lost, f"lost acknowledged messages: {lost[:5]}"
    assert not dups, f"duplicated messages: {list(dups.items())[:3]}"
    for a in acks:
        assert by_key[a.client_id][0]["id"] == a.message_id
    epochs = [m["epoch"] for m in stored]
    assert epochs == sorted(epochs), "a message committed under an older epoch after a newer one"


def json_line(obj) -> str:
    return json.dumps(obj, sort_keys=True)
