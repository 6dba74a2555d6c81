"""The store's exceptions: everything a caller may want to tell apart derives from StoreError."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class StoreUnavailable(StoreError):
    """The database cannot be reached, the connection was lost, or a lock was held too long.

    Retrying later may succeed; the caller should answer "service unavailable".
    """


class NotFound(StoreError):
    """A referenced row does not exist; `.what` names the kind ("user", "group"), `.id` the key."""

    def __init__(self, what: str, id: int) -> None:  # noqa: A002 - the brief names it .id
        super().__init__(f"{what} {id} not found")
        self.what = what
        self.id = id


class Fenced(StoreError):
    """This node no longer holds the lease under the epoch it believed it had."""

    def __init__(self, node_id: str, epoch: int, holder: str | None, current_epoch: int) -> None:
        super().__init__(
            f"fenced: {node_id!r} wrote under epoch {epoch}, "
            f"but the lease is {holder!r} at epoch {current_epoch}"
        )
        self.node_id = node_id
        self.epoch = epoch
        self.holder = holder
        self.current_epoch = current_epoch


class UsernameTaken(StoreError):
    """A user with the same username (compared case-insensitively) already exists."""

    def __init__(self, username: str) -> None:
        super().__init__(f"username {username!r} is taken")
        self.username = username
