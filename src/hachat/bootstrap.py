"""The original entry points (`python main.py`, `python database/database.py`) are run from a
checkout, often with the system's Python, which lacks hachat's dependencies. They then rerun
themselves with the checkout's virtualenv (the one `make run` makes), or say in one line how to
install. Standard library only: this runs before the dependencies are known to be there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

_RERUN_FLAG = "HACHAT_REEXEC"  # set for the rerun, so a broken venv cannot loop


def rerun_with_project_venv(repo: Path, missing: ImportError) -> NoReturn:
    """Replace this process by the same script under `repo/.venv`'s Python when there is one
    (and this is not already it); else exit 1 with `hachat: <what>; <how to install>`."""
    venv = repo / ".venv"
    venv_python = venv / "bin" / "python"
    in_venv = Path(sys.prefix).resolve() == venv.resolve()
    if venv_python.exists() and not in_venv and not os.environ.get(_RERUN_FLAG):
        os.environ[_RERUN_FLAG] = "1"
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    print(f"hachat: {missing}: this Python lacks hachat's dependencies; run `make run` once "
          "(it makes .venv) or `pip install -e .`, then run this again",
          file=sys.stderr)
    raise SystemExit(1)
