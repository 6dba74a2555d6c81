"""Start-up failures are told in one line on stderr, `hachat: <what is wrong, what to do>`, with
a non-zero exit status and no Python traceback (LOG_LEVEL=DEBUG shows the traceback). Each case
runs the real command line in its own process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from support import REPO, free_port, require_pg

COMMANDS = {"module": [sys.executable, "-m", "hachat", "serve"],
            "main.py": [sys.executable, str(REPO / "main.py")]}


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DB_") and k not in ("DATABASE_URL", "PORT", "PEER_URL", "HOST")}
    env.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'start.db'}", "LOG_LEVEL": "WARNING",
                "PORT": str(free_port())})
    env.update(extra)
    return env


def run(tmp_path, command=("module",), timeout=60, **env):
    argv = COMMANDS[command[0]] if len(command) == 1 and command[0] in COMMANDS \
        else [sys.executable, "-m", "hachat", *command]
    return subprocess.run(argv, env=_env(tmp_path, **env), cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(done, *words, code=None) -> str:
    """The single `hachat:` line of a failed start; checks there is no traceback."""
    assert done.returncode != 0, (done.returncode, done.stdout, done.stderr)
    if code is not None:
        assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hachat: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr
    message = errors[0]
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    return message


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("command", ["module", "main.py"])
def test_port_already_in_use(tmp_path, busy_port, command):
    done = run(tmp_path, (command,), PORT=str(busy_port), MAX_CONNECTIONS="1000")
    message = one_line_error(done, "already in use", str(busy_port), "PORT", code=1)
    assert done.stderr.strip() == message  # nothing else at LOG_LEVEL=WARNING


def test_port_in_use_shows_the_traceback_at_debug_level(tmp_path, busy_port):
    done = run(tmp_path, PORT=str(busy_port), LOG_LEVEL="DEBUG")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "Address already in use" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("hachat: ")


def test_host_that_does_not_resolve(tmp_path):
    done = run(tmp_path, HOST="no-such-host.invalid")
    one_line_error(done, "no-such-host.invalid", "HOST", code=1)


def test_postgresql_unreachable(tmp_path):
    closed = free_port()
    done = run(tmp_path, DATABASE_URL=f"postgresql://postgres:secret@127.0.0.1:{closed}/chat")
    message = one_line_error(done, "cannot connect", f"127.0.0.1:{closed}", "DATABASE_URL",
                             code=1)
    assert "secret" not in done.stderr  # the password is masked
    assert "running" in message


def test_postgresql_database_missing(tmp_path):
    require_pg()
    done = run(tmp_path, DATABASE_URL="postgresql://postgres@127.0.0.1:5432/hachat_no_such_db")
    message = one_line_error(done, "hachat_no_such_db", "does not exist", code=1)
    assert "CREATE DATABASE" in message or "createdb" in message


def test_db_upgrade_with_the_database_unreachable(tmp_path):
    closed = free_port()
    done = run(tmp_path, ("db", "upgrade"),
               DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/chat")
    one_line_error(done, "cannot connect", "DATABASE_URL", code=1)


def test_original_database_script_with_a_sqlite_file_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = subprocess.run([sys.executable, str(REPO / "database" / "database.py")],
                          env=_env(tmp_path, DATABASE_URL=f"sqlite:///{blocker / 'x' / 'c.db'}"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr


@pytest.mark.parametrize("url,words", [
    ("mysql://user@localhost/chat", ["DATABASE_URL", "mysql", "sqlite", "postgresql"]),
    ("not a url", ["DATABASE_URL"]),
    ("sqlite:///:memory:", ["DATABASE_URL", "file"]),
    ("sqlite://", ["DATABASE_URL", "file"]),
])
@pytest.mark.parametrize("command", ["module", "main.py"])
def test_unsupported_database_url(tmp_path, url, words, command):
    done = run(tmp_path, (command,), DATABASE_URL=url)
    one_line_error(done, *words, code=2)


def test_sqlite_file_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = run(tmp_path, DATABASE_URL=f"sqlite:///{blocker / 'sub' / 'chat.db'}")
    one_line_error(done, "sqlite", str(blocker), code=1)


@pytest.mark.parametrize("name,value", [
    ("PORT", "eighty"), ("PORT", "99999"), ("PORT", "-1"), ("IS_ACTIVE", "maybe"),
    ("PEER_URL", "localhost:8081"), ("PEER_URL", "ftp://peer:21"), ("PUBLIC_URL", "node-a"),
    ("DB_PORT", "five"), ("LEASE_TTL", "soon"), ("WORKERS", "0"), ("LOG_LEVEL", "LOUD"),
])
def test_bad_setting_values(tmp_path, name, value):
    extra = {name: value}
    if name == "DB_PORT":
        extra.update(DB_HOST="127.0.0.1", DATABASE_URL="")
    done = run(tmp_path, **extra)
    message = one_line_error(done, name, code=2)
    assert done.stderr.strip() == message


def test_bad_setting_for_the_cluster_command(tmp_path):
    done = run(tmp_path, ("cluster", "--ports", f"{free_port()},{free_port()}"),
               DATABASE_URL="mysql://u@h/db")
    one_line_error(done, "DATABASE_URL", code=2)


@pytest.mark.parametrize("ports", ["{p}", "a,b", "{p},{p}", "{p},70000", "{p},0"])
def test_bad_cluster_ports(tmp_path, ports):
    done = run(tmp_path, ("cluster", "--ports", ports.format(p=free_port())), timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--ports" in done.stderr


def _checkout(tmp_path, with_venv: bool):
    """A checkout as a new user has it: main.py, database/ and src/, and (after `make run`) a
    .venv whose python has the dependencies (here a wrapper around this test's Python)."""
    import shutil

    repo = tmp_path / "checkout"
    (repo / "database").mkdir(parents=True)
    shutil.copy(REPO / "main.py", repo / "main.py")
    shutil.copy(REPO / "database" / "database.py", repo / "database" / "database.py")
    (repo / "src").symlink_to(REPO / "src")
    if with_venv:
        venv_python = repo / ".venv" / "bin" / "python"
        venv_python.parent.mkdir(parents=True)
        venv_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        venv_python.chmod(0o755)
    return repo


def _bare(tmp_path, script, **env):
    """`script` run by a Python without hachat's dependencies (no site-packages: -I -S)."""
    return subprocess.run([sys.executable, "-I", "-S", str(script)], env=_env(tmp_path, **env),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", ["main.py", "database/database.py"])
def test_an_original_script_run_outside_the_venv_reruns_itself_with_it(tmp_path, script):
    repo = _checkout(tmp_path, with_venv=True)
    done = _bare(tmp_path, repo / script, DATABASE_URL="nosuchdb://x")
    # The error is the settings check's own: the script got as far as reading its settings.
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "DATABASE_URL" in done.stderr, done.stderr


def test_main_py_without_dependencies_says_how_to_install(tmp_path):
    repo = _checkout(tmp_path, with_venv=False)
    one_line_error(_bare(tmp_path, repo / "main.py"), "make run", "pip install", code=1)
