"""Bring the database schema to the newest version (the original entry point).

    python database/database.py

Uses the same settings as the server: DATABASE_URL (or the DB_* variables) from the
environment and `.env`; without them, the SQLite file data/hachat.db.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _import_hachat() -> None:
    try:
        import hachat  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))


def main() -> int:
    _import_hachat()
    try:
        from hachat.settings import SettingsError, load_settings
        from hachat.store import Database, StoreError
        from hachat.store.db import mask_url
    except ImportError as exc:
        from hachat.bootstrap import rerun_with_project_venv

        rerun_with_project_venv(REPO, exc)

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        db = Database(settings.database_url, pool_size=1)
    except (OSError, ValueError) as exc:  # e.g. the SQLite file's folder cannot be made
        print(f"error: cannot use {mask_url(settings.database_url)}: {exc}", file=sys.stderr)
        return 1
    try:
        db.upgrade()
        revision = db.schema_revision()
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    print(f"upgraded {mask_url(settings.database_url)} to schema revision {revision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
