"""Where long work reports how far it got: a terminal bar, a SQL heartbeat, or nothing.

Its own module, free of torch, because the lease code that renews from progress (jobs/leases.py)
runs in every CLI verb that submits, and those must not import the detectors to get a protocol.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Where long work reports how far it got: a terminal bar, a SQL heartbeat, or nothing."""

    def phase(self, name: str, total: int) -> None: ...

    def advance(self, n: int = 1, **info: float) -> None: ...


class NullProgress:
    def phase(self, name: str, total: int) -> None:
        pass

    def advance(self, n: int = 1, **info: float) -> None:
        pass
