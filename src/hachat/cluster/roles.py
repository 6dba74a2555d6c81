"""The node's role as one explicit state machine.

`TRANSITIONS` is the one place where the allowed role changes are written; `Node.transition`
refuses everything else with `InvalidTransition`.
"""

from __future__ import annotations

from enum import Enum


class Role(Enum):
    STARTING = "starting"  # deciding, at start, between passive and active
    PASSIVE = "passive"  # alive, not holding the lease: answers 503 for the API
    ACTIVE = "active"  # holds the database lease: serves everything
    FALLEN = "fallen"  # taken down on purpose (/fall): neither renews nor acquires

    def __str__(self) -> str:  # "passive", for log lines and JSON
        return self.value


TRANSITIONS: dict[Role, frozenset[Role]] = {
    Role.STARTING: frozenset({Role.PASSIVE, Role.ACTIVE, Role.FALLEN}),
    Role.PASSIVE: frozenset({Role.ACTIVE, Role.FALLEN}),
    Role.ACTIVE: frozenset({Role.PASSIVE, Role.FALLEN}),
    Role.FALLEN: frozenset({Role.PASSIVE}),
}


class InvalidTransition(RuntimeError):
    """A role change that `TRANSITIONS` does not allow."""

    def __init__(self, old: Role, new: Role) -> None:
        super().__init__(f"role {old.value} -> {new.value} is not allowed")
        self.old = old
        self.new = new


def allowed(old: Role, new: Role) -> bool:
    """True when `old -> new` is written in `TRANSITIONS`."""
    return new in TRANSITIONS[old]
