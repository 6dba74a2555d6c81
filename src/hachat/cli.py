"""Command line: `hachat serve` (default), `hachat db upgrade`, `hachat cluster`."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from hachat.settings import SettingsError, load_settings

log = logging.getLogger("hachat")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def mask_url(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    auth, host = rest.rsplit("@", 1)
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in auth else f"{scheme}://{user}@{host}"


# Net allocations of tracked objects between two passes over the youngest generation (the
# interpreter's default is 700). See `tune_garbage_collector`.
GC_YOUNG_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Set the cyclic garbage collector up for a server that holds many objects for long.

    Called once start-up is done. What start-up made (modules, the app, the ORM's metadata:
    ~70,000 objects) is frozen: a full pass no longer scans it each time. The youngest
    generation is collected every GC_YOUNG_THRESHOLD net allocations instead of 700: each
    parked long-poll keeps ~9 tracked objects alive for seconds, so with the default a burst
    of 5,000 of them promoted ~45,000 objects and set off a full pass over every parked
    request, about once per burst: on the fan-out bench 5-13 us of collector CPU per waiter,
    and pauses of 100-450 ms with the GIL held on a busy 2-CPU machine. Finished long-polls
    leave no cycles (see `Deferred`), so collecting less often lets little garbage wait.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class StartupError(Exception):
    """Start-up cannot go on; the message (one line) says what is wrong and what to do."""


def _started(build):
    """Run a start-up step; anything unexpected becomes a one-line `StartupError` (the
    traceback is logged at DEBUG level)."""
    from hachat.app import StartupError as AppStartupError

    try:
        return build()
    except AppStartupError as exc:
        raise StartupError(str(exc)) from exc
    except Exception as exc:
        raise StartupError(f"could not start: {type(exc).__name__}: {exc} "
                           "(LOG_LEVEL=DEBUG shows the traceback)") from exc


def serve() -> int:
    from hachat.app import HachatNode

    settings = load_settings()
    configure_logging(settings.log_level)
    node = _started(lambda: HachatNode(settings))
    host, port = _started(node.start)
    tune_garbage_collector()
    log.info("hachat node %s listening on http://%s:%d (database %s, peer %s)",
             settings.cluster.node_id, host, port, mask_url(settings.database_url),
             settings.cluster.peer_url or "none")

    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stopping.is_set():
            return
        stopping.set()
        log.info("signal %s: stopping (finishing requests in flight)", signal.Signals(signum).name)
        threading.Thread(target=node.stop, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.serve_forever()
    log.info("hachat node %s stopped", settings.cluster.node_id)
    return 0


def db_upgrade() -> int:
    from hachat.app import StartupError as AppStartupError
    from hachat.app import database_problem
    from hachat.store.db import Database

    settings = load_settings()
    configure_logging(settings.log_level)

    def upgrade() -> None:
        try:
            db = Database(settings.database_url)
        except (OSError, ValueError) as exc:
            raise AppStartupError(f"DATABASE_URL {mask_url(settings.database_url)}: "
                                  f"{exc}") from exc
        try:
            db.upgrade()
        except Exception as exc:
            raise AppStartupError(database_problem(exc, settings.database_url)) from exc
        finally:
            db.dispose()

    _started(upgrade)
    print(f"database schema is up to date: {mask_url(settings.database_url)}")
    return 0


def cluster(ports: tuple[int, int]) -> int:
    """Run an active and a passive node on two ports sharing one database; say where they are
    once both answer (the first one active), or stop both if either cannot start."""
    from hachat.cluster.monitor import PeerUnreachable, fetch_health

    first, second = ports
    settings = load_settings()  # also loads .env, so both nodes share its DATABASE settings
    base = dict(os.environ)
    base.setdefault("DATABASE_URL", settings.database_url)
    timing = settings.cluster
    # A lease left in the database by a node that died is free after one TTL; the first node
    # takes it once its not yet started peer has failed its health checks.
    takeover = 2 * timing.lease_ttl + timing.health_interval * timing.health_failures + 2.0
    children: list[subprocess.Popen] = []
    stopping = threading.Event()

    def stop_children(*_args) -> None:
        stopping.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)

    def url(port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def health(child: subprocess.Popen, port: int, *, active: bool,
               timeout: float) -> dict | None:
        """The node's /health once it answers (and, with `active`, says it is active, or
        `timeout` passed); None if it exited or we are stopping."""
        deadline = time.monotonic() + timeout
        report = None
        while not stopping.is_set() and child.poll() is None:
            try:
                report = fetch_health(url(port), 1.0)
            except PeerUnreachable:
                report = None
            if report is not None and (report.get("active") or not active):
                return report
            if time.monotonic() >= deadline:
                return report
            time.sleep(0.05)
        return None

    reports: list[dict | None] = []
    for port, peer, active in ((first, second, "true"), (second, first, "false")):
        env = dict(base, PORT=str(port), IS_ACTIVE=active, PEER_URL=url(peer),
                   NODE_ID=f"node-{port}", PUBLIC_URL=url(port))
        child = subprocess.Popen([sys.executable, "-m", "hachat", "serve"], env=env)
        children.append(child)
        report = health(child, port, active=False, timeout=60.0)
        if report is not None and active == "true":
            # Start the passive only once the first node holds the lease, so roles match.
            report = health(child, port, active=True, timeout=takeover)
        reports.append(report)
        if report is None:
            break
    if len(reports) == 2 and all(reports):
        roles = ", ".join(f"{'active' if r.get('active') else r.get('role')} {url(p)}"
                          for p, r in zip(ports, reports, strict=True) if r)
        print(f"hachat cluster: {roles}; database {mask_url(base['DATABASE_URL'])}; "
              "Ctrl-C stops both", flush=True)
    elif not stopping.is_set():
        failed = ports[len(reports) - 1]
        child = children[-1]
        status = child.poll()
        why = f"exited with status {status}" if status is not None else "did not answer"
        print(f"hachat: cluster: the node on port {failed} {why} at start-up (see above); "
              "stopping", file=sys.stderr, flush=True)
        stop_children()
        for child in children:
            child.wait()
        return 1
    codes = [child.wait() for child in children]
    return 0 if all(code == 0 for code in codes) else 1


def port_pair(text: str) -> tuple[int, int]:
    """`--ports 8080,8081`: two different ports, 1-65535."""
    try:
        a, b = (int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"two ports separated by a comma, such as 8080,8081, "
                                         f"not {text!r}") from None
    if not (0 < a < 65536 and 0 < b < 65536) or a == b:
        raise argparse.ArgumentTypeError(f"two different ports between 1 and 65535, not {text!r}")
    return a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hachat", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run one node (settings from the environment and .env)")
    db = sub.add_parser("db", help="database schema")
    db.add_argument("action", choices=["upgrade"])
    cl = sub.add_parser("cluster", help="run an active/passive pair on one machine")
    cl.add_argument("--ports", type=port_pair, default=(8080, 8081),
                    help="two ports, active first (default 8080,8081)")
    args = parser.parse_args(argv)
    try:
        if args.command in (None, "serve"):
            return serve()
        if args.command == "db":
            return db_upgrade()
        if args.command == "cluster":
            return cluster(args.ports)
    except SettingsError as exc:
        print(f"hachat: bad setting: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        log.debug("start-up failed", exc_info=True)
        print(f"hachat: {exc}", file=sys.stderr)
        return 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
