"""`hachat serve` lifts its open-files limit toward what MAX_CONNECTIONS needs, and warns only
when the limit is really too low for the configured connections. Real processes started with
a real RLIMIT_NOFILE; the raised limit is read back from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import call, free_port

resource = pytest.importorskip("resource")

pytestmark = pytest.mark.skipif(not Path("/proc/self/limits").exists(),
                                reason="needs Linux's /proc/<pid>/limits")


def _open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def serve_with_limit(tmp_path, soft: int, hard: int, **env) -> tuple[str, tuple[int, int]]:
    """Start a node whose open-files limit is (soft, hard); return its output and the limit
    it runs with once it answers."""
    _, current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if current_hard != resource.RLIM_INFINITY and current_hard < hard:
        pytest.skip(f"this machine's hard limit ({current_hard}) is below {hard}")
    port = free_port()
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("DB_") and k not in ("DATABASE_URL", "PEER_URL")}
    full_env.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'fd.db'}", "PORT": str(port),
                     "LOG_LEVEL": "WARNING", **env})
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hachat", "serve"], env=full_env, cwd=tmp_path, stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if call(f"http://127.0.0.1:{port}", "GET", "/health", timeout=1).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        limits = _open_files(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    return log.read_text(), limits


def _limit_warnings(output: str) -> list[str]:
    return [line for line in output.splitlines()
            if "open-file limit" in line and "WARNING" in line]


def test_no_warning_at_default_settings_when_the_hard_limit_covers_the_connections(tmp_path):
    # A common set-up: a soft limit of 1024 and a hard limit of 20000 (= MAX_CONNECTIONS).
    output, (soft, hard) = serve_with_limit(tmp_path, 1024, 20_000)
    assert not _limit_warnings(output), output
    assert (soft, hard) == (20_000, 20_000)  # lifted as far as the hard limit allows


def test_no_warning_when_few_connections_are_configured(tmp_path):
    output, (soft, _) = serve_with_limit(tmp_path, 1024, 4096, MAX_CONNECTIONS="500")
    assert "open-file limit" not in output, output
    assert soft == 1024  # already enough: left alone


def test_warns_when_the_hard_limit_is_too_low_for_max_connections(tmp_path):
    output, (soft, _) = serve_with_limit(tmp_path, 1024, 4096, MAX_CONNECTIONS="10000")
    assert soft == 4096
    warnings = _limit_warnings(output)
    assert len(warnings) == 1, output
    assert "4096" in warnings[0] and "MAX_CONNECTIONS is 10000" in warnings[0]
