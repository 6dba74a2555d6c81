"""The chat page in a real headless Chromium (Playwright): two users in two browser contexts,
through HAProxy in front of a pair when HAProxy is installed, else on the active node itself.
Screenshots go to artifacts/screenshots/."""

from __future__ import annotations

import re

import pytest
from harness import stored_messages

from hachat.client import HachatClient

PASSWORD = "password123"

pytestmark = [pytest.mark.browser,
              pytest.mark.parametrize("fresh_db", ["sqlite"], indirect=True)]

MARK_NO_RELOAD = "window.__sameDocument = true"
SAME_DOCUMENT = "window.__sameDocument === true"


def db_message_ids(base: str, username: str, group_id: int) -> list[int]:
    """The group's messages as the server stores them, oldest first (read through the API)."""
    reader = HachatClient(base)
    reader.login(username, PASSWORD)
    return [m["id"] for m in stored_messages(base, reader.token, group_id)]


def test_two_users_chat_live_delete_and_escaping(site, open_chat, screenshot):
    base, _ = site
    ana = open_chat(base).sign_in("ana")
    bea = open_chat(base).sign_in("bea")
    screenshot(bea.page, "01-bea-signed-in-no-groups")
    for chat in (ana, bea):
        chat.page.evaluate(MARK_NO_RELOAD)

    gid = ana.create_group("weekend")
    ana.add_member("bea")
    bea.open_group(gid, "weekend")  # the group appeared in bea's list live
    ana.expect(bea.page.locator("#member-list li.member")).to_have_text(["ana", "bea"])

    ana.send("Hi Bea! Hiking on Saturday?")
    first = ana.wait_message("Hiking on Saturday")
    assert bea.wait_message("Hiking on Saturday") == first
    bea.send("Yes! 9:00 at the station.")
    second = bea.wait_message("9:00 at the station")
    assert ana.wait_message("9:00 at the station") == second
    mine = re.compile(r"\bmine\b")
    ana.expect(ana.message("Hiking")).to_have_class(mine)
    ana.expect(bea.message("Hiking")).not_to_have_class(mine)
    ana.expect(bea.message("Hiking").locator(".author")).to_have_text("ana")
    ana.expect(bea.message("Hiking").locator(".delete-message")).to_have_count(0)
    screenshot(ana.page, "02-conversation-ana")
    screenshot(bea.page, "02-conversation-bea")

    # a deletion disappears for both
    ana.send("oops, wrong group")
    oops = ana.wait_message("oops, wrong group")
    assert bea.wait_message("oops, wrong group") == oops
    bea.send("Which group did you mean?")
    question = bea.wait_message("Which group did you mean?")
    assert ana.wait_message("Which group did you mean?") == question
    screenshot(bea.page, "03-before-deletion-bea")
    ana.message("oops, wrong group").locator(".delete-message").click()
    for chat in (ana, bea):
        chat.expect(chat.page.locator(f'#message-list li[data-id="{oops}"]')).to_have_count(0)
    screenshot(bea.page, "04-after-deletion-bea")

    # markup is shown as text, never run
    payload = ('<script>window.__pwned = "script"</script>'
               '<img src="x" onerror="window.__pwned = \'img\'"><b>bold?</b>')
    bea.send(payload)
    shown = bea.wait_message("window.__pwned")
    assert ana.wait_message("window.__pwned") == shown
    for chat in (ana, bea):
        item = chat.page.locator(f'#message-list li.message[data-id="{shown}"]')
        chat.expect(item.locator(".content")).to_have_text(payload)
        assert item.locator("script, img, b").count() == 0
        assert chat.page.evaluate("window.__pwned") is None
    screenshot(ana.page, "05-script-shown-as-text")

    # deleting the newest message, then sending: the new message shows (its id is new)
    bea.message("window.__pwned").locator(".delete-message").click()
    for chat in (ana, bea):
        chat.expect(chat.page.locator(f'#message-list li[data-id="{shown}"]')).to_have_count(0)
    bea.send("Sorry, that was a test.")
    last = bea.wait_message("Sorry, that was a test.")
    assert ana.wait_message("Sorry, that was a test.") == last and last != shown

    expected = db_message_ids(base, "ana", gid)
    assert expected == [first, second, question, last]
    for chat in (ana, bea):
        assert chat.message_ids() == expected
        assert chat.page.evaluate(SAME_DOCUMENT), "the page was reloaded"
        assert chat.errors == []


def test_history_pages_back_with_load_older(site, open_chat, screenshot):
    base, _ = site
    seeder = HachatClient(base)
    seeder.login("archivist", PASSWORD)
    gid = seeder.create_group("archive")["id"]
    for n in range(1, 121):
        seeder.post_message(gid, f"history {n:03d}")
    expected = db_message_ids(base, "archivist", gid)
    assert len(expected) == 120

    chat = open_chat(base).sign_in("archivist")  # the only group opens by itself
    chat.expect(chat.page.locator("#group-title")).to_have_text("archive")
    items = chat.page.locator("#message-list li.message")
    older = chat.page.locator("#load-older")
    start = chat.page.locator("#history-start")
    chat.expect(items).to_have_count(50)
    assert chat.message_ids() == expected[-50:]
    chat.expect(older).to_be_visible()
    chat.expect(start).to_be_hidden()
    screenshot(chat.page, "01-history-latest-50")

    older.click()
    chat.expect(items).to_have_count(100)
    assert chat.message_ids() == expected[-100:]
    older.click()
    chat.expect(items).to_have_count(120)
    chat.expect(older).to_be_hidden()
    chat.expect(start).to_be_visible()
    assert chat.message_ids() == expected
    chat.expect(items.first.locator(".content")).to_have_text("history 001")
    screenshot(chat.page, "02-history-all-loaded")

    # a new message after paging back lands at the bottom, once
    chat.send("history 121")
    new = chat.wait_message("history 121")
    chat.expect(items).to_have_count(121)
    assert chat.message_ids() == expected + [new]
    assert chat.errors == []
