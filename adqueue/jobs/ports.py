"""The interfaces between the job code and whatever runs the work: a queue, or this process.

`Dispatcher` is what submitting, resuming and reconciling send work through; adqueue.workers
implements it on Celery/Redis, adqueue.runners.inline in this process (the embedded default).
`Outbox` is a dispatcher whose broker can also be read back, which the reconciler compares with
SQL to find lost messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Dispatcher(Protocol):
    """Sends work to whoever runs it. `queue` is the Celery queue, None in this process."""

    queue: str | None

    def enqueue_train(self, job_id: int) -> None: ...

    def enqueue_shards(self, shard_ids: Sequence[int], *, countdown: float = 0.0) -> None: ...

    def enqueue_finish(self, job_id: int) -> None: ...

    def after_submit(self, job_id: int) -> None: ...


class Outbox(Dispatcher, Protocol):
    """A dispatcher whose broker can also be read: how many messages wait, and for what."""

    def message_count(self) -> int: ...

    def message_ids(self) -> dict[str, set[int]]: ...  # "shard" / "train" / "finish" -> ids

    def dead_letters(self) -> int: ...  # malformed entries the workers moved aside


class ScoreProgress(Protocol):
    """Where an in-process run of a sharded job reports its images (a terminal bar, or nothing)."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def stop(self) -> None: ...


class NullScoreProgress:
    """No terminal bar (benchmarks, `adqueue reconcile`)."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass
