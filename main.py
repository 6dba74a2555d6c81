"""The original entry point: `python main.py` starts a node (same as `hachat serve`)."""

import sys
from pathlib import Path

try:
    import hachat  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from hachat.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve"]))
