"""The command line: `hachat cluster` runs a pair and stops it on Ctrl-C; `hachat db upgrade`
and the original `python database/database.py` bring the schema up; bad settings are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from support import REPO, call, free_port


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DB_") and k not in ("DATABASE_URL", "PORT", "PEER_URL")}
    env.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}", "LOG_LEVEL": "WARNING"})
    env.update(extra)
    return env


def _cluster(tmp_path, env: dict[str, str], stderr=subprocess.DEVNULL):
    """`hachat cluster` on two free ports: (process, first port, second port)."""
    a, b = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hachat", "cluster", "--ports", f"{a},{b}"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr,
                            text=True)
    return proc, a, b


def test_cluster_runs_a_pair_and_stops_on_ctrl_c(tmp_path):
    proc, a, b = _cluster(tmp_path, _env(tmp_path), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        roles = None
        while time.monotonic() < deadline:
            try:
                roles = [call(f"http://127.0.0.1:{p}", "GET", "/health", timeout=1).json
                         for p in (a, b)]
                if roles[0]["active"] and roles[1]["role"] == "passive":
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert roles and roles[0]["active"] is True and roles[1]["active"] is False, roles
        assert roles[1]["peer"] == f"http://127.0.0.1:{a}"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    for p in (a, b):
        try:
            call(f"http://127.0.0.1:{p}", "GET", "/health", timeout=1)
            raise AssertionError(f"port {p} still answers")
        except OSError:
            pass


def _port_answers(port: int) -> bool:
    try:
        call(f"http://127.0.0.1:{port}", "GET", "/health", timeout=1)
        return True
    except OSError:
        return False


def test_cluster_says_where_the_active_and_passive_nodes_are_once_they_are(tmp_path):
    proc, a, b = _cluster(tmp_path, _env(tmp_path))
    try:
        line = proc.stdout.readline()
        # Printed only once true: both answer now, the first active, the second passive.
        health = [call(f"http://127.0.0.1:{p}", "GET", "/health", timeout=2).json for p in (a, b)]
        assert health[0]["active"] is True and health[1]["role"] == "passive", (line, health)
        assert f"active http://127.0.0.1:{a}" in line and f"passive http://127.0.0.1:{b}" in line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_cluster_waits_out_a_lease_left_by_a_killed_node(tmp_path):
    """A node of an earlier run, killed -9, still holds the lease in the shared database for
    one TTL: the first node of the pair must still end up the active one, as printed."""
    env = _env(tmp_path)
    old_port = free_port()
    old = subprocess.Popen([sys.executable, "-m", "hachat", "serve"],
                           env={**env, "PORT": str(old_port), "NODE_ID": "earlier-run"},
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not _port_answers(old_port):
        assert time.monotonic() < deadline and old.poll() is None
        time.sleep(0.05)
    old.kill()
    old.wait(10)
    proc, a, b = _cluster(tmp_path, env)
    try:
        line = proc.stdout.readline()
        health = [call(f"http://127.0.0.1:{p}", "GET", "/health", timeout=2).json for p in (a, b)]
        assert [h["active"] for h in health] == [True, False], (line, health)
        assert f"active http://127.0.0.1:{a}" in line, line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_cluster_stops_at_once_when_a_node_cannot_start(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        other = free_port()
        done = subprocess.run([sys.executable, "-m", "hachat", "cluster", "--ports",
                               f"{other},{taken}"], env=_env(tmp_path), cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert "already in use" in done.stderr
    assert "active" not in done.stdout  # never claimed the pair was up
    assert not _port_answers(other)  # the node that did start was stopped


def test_db_upgrade_commands(tmp_path):
    env = _env(tmp_path)
    done = subprocess.run([sys.executable, "-m", "hachat", "db", "upgrade"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout
    original = subprocess.run([sys.executable, str(REPO / "database" / "database.py")], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert original.returncode == 0, original.stderr
    assert (tmp_path / "cli.db").exists()


def test_original_main_py_serves(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py")],
                            env=_env(tmp_path, PORT=str(port)), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                health = call(f"http://127.0.0.1:{port}", "GET", "/health", timeout=1).json
                break
            except OSError:
                time.sleep(0.1)
        assert health["status"] == "alive"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_bad_setting_is_refused_with_its_name(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hachat", "serve"],
                          env=_env(tmp_path, PORT="eighty"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "PORT" in done.stderr


def test_dotenv_file_is_read(tmp_path):
    port = free_port()
    (tmp_path / ".env").write_text(f"PORT={port}\nNODE_ID=from-dotenv\n")
    env = _env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "hachat", "serve"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        health = None
        while time.monotonic() < deadline and health is None:
            try:
                health = call(f"http://127.0.0.1:{port}", "GET", "/health", timeout=1).json
            except OSError:
                time.sleep(0.1)
        assert health and health["node"] == "from-dotenv"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
