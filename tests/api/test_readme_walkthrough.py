"""The README's curl walk-through, run as printed against a freshly started node."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from support import REPO, NodeProcess, require_pg


def walkthrough_script() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->",
                      text, re.S)
    assert block, "README.md lost its walk-through block"
    return block.group(1)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_readme_walkthrough(kind, tmp_path):
    if shutil.which("curl") is None:
        pytest.fail("curl is needed to run the README walk-through")
    if kind == "postgres":
        require_pg()
        import dbutil

        url = dbutil.create_pg_database()
    else:
        url = f"sqlite:///{tmp_path / 'walk.db'}"
    node = NodeProcess({"DATABASE_URL": url, "IS_ACTIVE": "true", "PEER_URL": "",
                        "ADMIN_TOKEN": ""}, tmp_path, name="walk")
    try:
        node.start()
        node.wait_active()
        env = {**os.environ, "HACHAT_URL": node.url}
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough_script()], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr + done.stdout + node.log()
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert lines[0]["status"] == "alive" and lines[0]["active"] is True
        history = next(x for x in lines if "messages" in x)
        assert history["messages"][0]["content"] == "Olá do cURL!"
        assert any("chats" in x and x["chats"][0]["name"] == "friends" for x in lines)
        assert any("users" in x and len(x["users"]) == 2 for x in lines)
        assert any("deleted" in x for x in lines)
        fell = next(x for x in lines if x.get("status") == "down")
        assert fell["active"] is False
        assert lines[-1]["status"] == "alive" and lines[-1]["active"] is True
    finally:
        node.stop()
        if kind == "postgres":
            import dbutil

            dbutil.drop_pg_database(url)
