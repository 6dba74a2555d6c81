"""Fixtures for the client tests: a real pair of nodes on a fresh database, HAProxy in front of
it, and a headless Chromium driven by Playwright.

HAProxy and Chromium are optional locally (the tests that need them are skipped, saying why)
and required in CI (`support.required`), where a missing one fails the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _extra in (_HERE.parent, _HERE.parent / "failover"):  # support.py, dbutil.py, harness.py
    if str(_extra) not in sys.path:
        sys.path.insert(0, str(_extra))

from harness import Pair  # noqa: E402

from support import REPO, call, free_port, fresh_database, required  # noqa: E402

HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = REPO / "artifacts" / "screenshots"
PASSWORD = "password123"


def poll_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.05) -> object:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - keep polling; reported on timeout
            last_exc, value = exc, None
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def need(what: str, available: bool, reason: str) -> None:
    """Skip locally, fail in CI (or when HACHAT_REQUIRE_<WHAT>=1), when something is missing."""
    if available:
        return
    if required(what):
        pytest.fail(f"{reason} (required here)")
    pytest.skip(reason)


@pytest.fixture
def wait_for() -> Callable[..., object]:
    """wait_for(predicate, timeout, what): poll until truthy (test files cannot import this
    module: its name, conftest, is taken by tests/conftest.py)."""
    return poll_until


# ------------------------------------------------------------------ database and nodes

@pytest.fixture(params=["sqlite", "postgres"])
def fresh_db(request, tmp_path) -> Iterator[str]:
    """A new empty database per test (as in tests/failover): the lease row is the cluster."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def pair(fresh_db, tmp_path) -> Iterator[Pair]:
    """Node A active, node B passive, one database."""
    p = Pair(fresh_db, tmp_path)
    try:
        p.start()  # inside the try: a node that fails to start must not outlive the test
        poll_until(lambda: p.active_nodes() == [p.a], 10, "node A alone active")
        yield p
    finally:
        p.stop()


# ------------------------------------------------------------------ HAProxy

class HAProxy:
    """`haproxy -db -f deploy/haproxy.cfg` on a free port, in front of a Pair."""

    def __init__(self, pair: Pair, workdir: Path) -> None:
        self.pair = pair
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "haproxy.log"
        self.env = {**os.environ, "HACHAT_LB_HOST": "127.0.0.1",
                    "HACHAT_LB_PORT": str(self.port),
                    "HACHAT_NODE_A": f"127.0.0.1:{pair.ports[0]}",
                    "HACHAT_NODE_B": f"127.0.0.1:{pair.ports[1]}",
                    "HACHAT_LB_MAXCONN": "256", "HACHAT_LB_LOG_LEVEL": "info"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CFG)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        # HAProxy starts with every server up: wait until its checks took the passive one out,
        # or a request could still reach B (which would only answer 503 not_active).
        poll_until(lambda: self.marked_down("node_b"), 15, f"haproxy marking node_b down\n{self.log()}")
        self.wait_routes_to("node-a", timeout=15)
        return self

    def marked_down(self, server: str) -> bool:
        """Whether the log says the checks took `server` (node_a / node_b) out, and it has not
        come back since."""
        text = self.log_path.read_text(errors="replace")
        down = text.rfind(f"Server hachat_nodes/{server} is DOWN")
        return down >= 0 and down > text.rfind(f"Server hachat_nodes/{server} is UP")

    def node_behind(self) -> str | None:
        """Which node answers through the proxy, when it is the active one (else None)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
        try:
            reply = call(self.url, "GET", "/health", timeout=2)
        except OSError:
            return None
        if reply.status == 200 and reply.json.get("active"):
            return reply.json.get("node")
        return None

    def wait_routes_to(self, node: str, timeout: float) -> None:
        """Until several requests in a row reach `node`, and it is active."""
        def settled() -> bool:
            return all(self.node_behind() == node for _ in range(3))

        poll_until(settled, timeout, f"haproxy routing to active {node}\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def haproxy_available() -> tuple[bool, str]:
    if shutil.which("haproxy") is None:
        return False, "haproxy is not installed (Debian package `haproxy`)"
    out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+)\.(\d+)", out)
    if not found or (int(found[1]), int(found[2])) < (2, 2):
        return False, f"haproxy >= 2.2 is needed, found: {out.splitlines()[:1]}"
    return True, ""


@pytest.fixture
def make_haproxy(tmp_path) -> Iterator[Callable[..., HAProxy]]:
    """make_haproxy(pair, **env) starts HAProxy in front of `pair` (env overrides e.g.
    HACHAT_NODE_A), or skips/fails when it is not installed; stopped after the test."""
    started: list[HAProxy] = []

    def make(pair: Pair, **env: str) -> HAProxy:
        ok, reason = haproxy_available()
        need("haproxy", ok, reason)
        lb = HAProxy(pair, tmp_path)
        lb.env.update(env)
        started.append(lb)
        return lb.start()

    yield make
    for lb in started:
        lb.stop()


@pytest.fixture
def haproxy(pair, make_haproxy) -> HAProxy:
    """HAProxy (deploy/haproxy.cfg) in front of the pair, routing to node A."""
    return make_haproxy(pair)


# ------------------------------------------------------------------ browser

@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (each test opens its own contexts)."""
    have_chromium = os.access(CHROMIUM, os.X_OK)
    need("browser", have_chromium, f"{CHROMIUM} is not installed (Debian package `chromium`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("browser", False, "Playwright for Python is not installed (pip install -e '.[test]')")
        raise
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            with contextlib.suppress(Exception):
                b.close()


def _artifact_prefix(request) -> str:
    """<test name>, safe as a file name; this test's screenshots of an earlier run removed."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    test = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    for old in SCREENSHOTS.glob(f"{test}--*.png"):
        old.unlink(missing_ok=True)
    return test


@pytest.fixture
def screenshot(request) -> Callable:
    """screenshot(page, "what") saves artifacts/screenshots/<test>--<what>.png."""
    test = _artifact_prefix(request)

    def take(page, what: str) -> Path:
        path = SCREENSHOTS / f"{test}--{what}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


# Records every value #status[data-state] takes, from the first paint on.
_STATUS_RECORDER = """
window.__statusLog = [];
document.addEventListener('DOMContentLoaded', () => {
  const box = document.getElementById('status');
  const record = () => {
    const log = window.__statusLog;
    if (log[log.length - 1] !== box.dataset.state) log.push(box.dataset.state);
  };
  record();
  new MutationObserver(record).observe(box, { attributes: true, attributeFilter: ['data-state'] });
});
"""


class ChatPage:
    """One user's tab on the chat page, through the page's documented hooks (docs/CLIENTS.md)."""

    def __init__(self, page, base_url: str) -> None:
        from playwright.sync_api import expect

        self.page = page
        self.base_url = base_url
        self.expect = expect
        self.username: str | None = None
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def sign_in(self, username: str, password: str = PASSWORD) -> ChatPage:
        page = self.page
        page.goto(self.base_url + "/")
        page.fill("#login-username", username)
        page.fill("#login-password", password)
        page.click("#login-submit")
        self.expect(page.locator("#chat-view")).to_be_visible()
        self.expect(page.locator("#current-user")).to_have_text(username)
        self.wait_state("active")
        self.username = username
        return self

    def wait_state(self, state: str, timeout: float = 10) -> None:
        self.expect(self.page.locator("#status")).to_have_attribute(
            "data-state", state, timeout=timeout * 1000)

    def status_log(self) -> list[str]:
        return self.page.evaluate("window.__statusLog")

    def create_group(self, name: str) -> int:
        page = self.page
        page.fill("#new-group-name", name)
        page.click("#create-group")
        self.expect(page.locator("#group-title")).to_have_text(name)
        selected = page.locator("#group-list button.group.selected")
        self.expect(selected).to_have_count(1)
        return int(selected.get_attribute("data-id"))

    def add_member(self, username: str) -> None:
        page = self.page
        page.fill("#add-member-username", username)
        page.click("#add-member")
        self.expect(page.locator("#member-info")).to_have_text(f"{username} added.")
        self.expect(page.locator("#member-list li.member", has_text=username)).to_have_count(1)

    def open_group(self, group_id: int, name: str, timeout: float = 10) -> None:
        button = self.page.locator(f'#group-list button.group[data-id="{group_id}"]')
        self.expect(button).to_be_visible(timeout=timeout * 1000)  # appears live when added
        button.click()
        self.expect(self.page.locator("#group-title")).to_have_text(name)
        self.expect(button).to_have_class("group selected")

    def send(self, text: str) -> None:
        """Type and press Enter (not waiting for the answer: it may be a retried send)."""
        self.page.fill("#message-input", text)
        self.page.press("#message-input", "Enter")

    def message(self, text: str):
        return self.page.locator("#message-list li.message", has=self.page.locator(
            ".content", has_text=text))

    def wait_message(self, text: str, timeout: float = 10) -> int:
        item = self.message(text)
        try:
            self.expect(item).to_have_count(1, timeout=timeout * 1000)
        except AssertionError as exc:
            raise AssertionError(f"{self.username}: no single message {text!r}: "
                                 f"{self.describe()}") from exc
        return int(item.get_attribute("data-id"))

    def describe(self) -> str:
        """What the page shows, for failure messages."""
        return str(self.page.evaluate("""() => ({
            status: document.getElementById('status').dataset.state,
            statusText: document.getElementById('status-text').textContent,
            statusLog: window.__statusLog,
            sendError: document.getElementById('send-error').textContent,
            groupError: document.getElementById('group-error').textContent,
            pending: document.querySelectorAll('#message-list li.pending').length,
            messages: Array.from(document.querySelectorAll('#message-list li.message'),
                                 (li) => [li.dataset.id, li.querySelector('.content').textContent]),
            cursor: window.hachat && window.hachat.state.cursor,
        })""")) + f" page errors: {self.errors}"

    def message_ids(self) -> list[int]:
        """The data-id of every shown `.message`, top to bottom (duplicates kept)."""
        return self.page.eval_on_selector_all(
            "#message-list li.message", "items => items.map(li => Number(li.dataset.id))")

    def pending_count(self) -> int:
        return self.page.locator("#message-list li.pending").count()


@pytest.fixture
def open_chat(browser, request) -> Iterator[Callable[[str], ChatPage]]:
    """open_chat(base_url) -> a ChatPage in a new browser context (its own sessionStorage).
    On failure every open page is saved to artifacts/screenshots/<test>--failure-<n>.png."""
    test = _artifact_prefix(request)
    contexts = []
    pages: list[ChatPage] = []

    def open_one(base_url: str) -> ChatPage:
        context = browser.new_context(viewport={"width": 1100, "height": 760})
        context.set_default_timeout(10_000)
        context.add_init_script(_STATUS_RECORDER)
        contexts.append(context)
        chat = ChatPage(context.new_page(), base_url)
        pages.append(chat)
        return chat

    yield open_one
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for n, chat in enumerate(pages, 1):
            with contextlib.suppress(Exception):
                chat.page.screenshot(path=str(SCREENSHOTS / f"{test}--failure-{n}.png"))
    for context in contexts:
        with contextlib.suppress(Exception):
            context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def site(pair, tmp_path) -> Iterator[tuple[str, HAProxy | None]]:
    """Where the browser goes: HAProxy in front of the pair when HAProxy is installed (required
    in CI), else the active node directly. Yields (base URL, the HAProxy or None)."""
    ok, reason = haproxy_available()
    if not ok and required("haproxy"):
        pytest.fail(f"{reason} (required here)")
    if not ok:
        yield pair.a.url, None
        return
    lb = HAProxy(pair, tmp_path)
    try:
        yield lb.start().url, lb
    finally:
        lb.stop()
