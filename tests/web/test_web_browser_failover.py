"""Two users chatting in headless Chromium through HAProxy while the active node is killed
(kill -9) mid-conversation: both pages show "reconnecting", then carry on, and every message
is shown exactly once on both, the same as the server has stored."""

from __future__ import annotations

import signal

import pytest
from harness import stored_messages

from hachat.client import HachatClient

PASSWORD = "password123"

pytestmark = [pytest.mark.browser,
              pytest.mark.parametrize("fresh_db", ["sqlite"], indirect=True)]


def test_kill_9_of_the_active_mid_conversation(pair, haproxy, open_chat, screenshot, wait_for):
    base = haproxy.url
    ana = open_chat(base).sign_in("ana")
    bea = open_chat(base).sign_in("bea")
    both = (ana, bea)
    gid = ana.create_group("failover")
    ana.add_member("bea")
    bea.open_group(gid, "failover")
    for chat in both:
        chat.page.evaluate("window.__sameDocument = true")
        chat.expect(chat.page.locator("#status-text")).to_contain_text("node-a")

    lines = [(ana, "ana 1: the servers are up"), (bea, "bea 1: good"),
             (ana, "ana 2: let's pull a plug"), (bea, "bea 2: go ahead")]
    for author, text in lines:
        author.send(text)
        for chat in both:
            chat.wait_message(text)
    screenshot(ana.page, "01-before-the-kill")

    pair.a.signal(signal.SIGKILL)
    pair.a.proc.wait(5)
    # the conversation goes on while no node is active: both sends wait, then go through once
    during = [(ana, "ana 3: sent while the active node was dead"),
              (bea, "bea 3: me too, during the failover")]
    for author, text in during:
        author.send(text)
    for chat in both:
        wait_for(lambda chat=chat: "reconnecting" in chat.status_log(), 10,
                 f"{chat.username}'s page to show reconnecting")
    screenshot(ana.page, "02-reconnecting")
    for chat in both:
        chat.wait_state("active", timeout=20)
        chat.expect(chat.page.locator("#status-text")).to_contain_text("node-b", timeout=15_000)
        for _, text in during:
            chat.wait_message(text, timeout=15)
        chat.expect(chat.page.locator("#message-list li.pending")).to_have_count(0)
    assert pair.wait_one_active(exclude=pair.a) is pair.b

    after = [(ana, "ana 4: back on node B"), (bea, "bea 4: nothing lost here")]
    for author, text in after:
        author.send(text)
        for chat in both:
            chat.wait_message(text)
    screenshot(ana.page, "03-after-failover-ana")
    screenshot(bea.page, "03-after-failover-bea")

    reader = HachatClient(base)
    reader.login("ana", PASSWORD)
    stored = stored_messages(base, reader.token, gid)
    assert [m["content"] for m in stored][:4] == [text for _, text in lines]
    assert sorted(m["content"] for m in stored[4:6]) == sorted(text for _, text in during)
    assert [m["content"] for m in stored][6:] == [text for _, text in after]
    assert {m["epoch"] for m in stored[:4]} == {1} and {m["epoch"] for m in stored[4:]} == {2}
    for chat in both:
        shown = chat.message_ids()
        assert len(shown) == len(set(shown)), f"{chat.username}: a message shown twice: {shown}"
        assert shown == [m["id"] for m in stored], chat.describe()
        log = chat.status_log()
        assert log.index("reconnecting") < len(log) - 1 and log[-1] == "active", log
        assert chat.page.evaluate("window.__sameDocument === true"), "the page was reloaded"
        assert chat.errors == []
