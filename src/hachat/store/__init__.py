"""The store layer: SQLAlchemy models, query functions, the fencing lease, migrations.

It imports nothing from the other hachat layers.
"""

from .db import Database, utcnow_iso
from .errors import Fenced, NotFound, StoreError, StoreUnavailable, UsernameTaken

__all__ = [
    "Database",
    "Fenced",
    "NotFound",
    "StoreError",
    "StoreUnavailable",
    "UsernameTaken",
    "utcnow_iso",
]
