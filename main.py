"""The original entry point: `python main.py` starts a node (same as `hachat serve`)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent

try:
    import hachat  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

from hachat.bootstrap import rerun_with_project_venv  # noqa: E402

try:
    import hachat.app  # noqa: F401  (SQLAlchemy, httptools, argon2...)
except ImportError as exc:
    rerun_with_project_venv(REPO, exc)

from hachat.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["serve"]))
