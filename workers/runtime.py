"""What a worker process keeps between tasks: settings, database, device, loaded models.

Built lazily on the first task, i.e. after any prefork fork, so a parent never opens a database
socket or a CUDA context that its children would inherit.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from celery.signals import worker_process_init
from sqlalchemy import update

from adqueue.config import Settings
from adqueue.service.context import Context
from adqueue.service.models import ModelCache, apply_torch_threads, resolve_device
from adqueue.store.models import Job, utcnow

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 2.0


@dataclass
class WorkerRuntime:
    settings: Settings

    @cached_property
    def ctx(self) -> Context:
        return Context(self.settings)

    def __post_init__(self) -> None:
        apply_torch_threads(self.settings.torch_threads)

    @cached_property
    def device(self) -> Any:
        device = resolve_device(self.settings.device)
        log.info("worker %s computes on %s", self.name, device)
        return device

    @cached_property
    def models(self) -> ModelCache:
        return ModelCache(self.ctx, self.device)

    @cached_property
    def name(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"


_runtime: WorkerRuntime | None = None


def current_runtime() -> WorkerRuntime:
    global _runtime
    if _runtime is None or _runtime.name != f"{socket.gethostname()}:{os.getpid()}":
        _runtime = WorkerRuntime(Settings.load())
    return _runtime


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A prefork child: start with a fresh runtime and its share of the CPU threads."""
    global _runtime
    _runtime = None
    children = int(os.environ.get("ADQUEUE_WORKER_CONCURRENCY", "1"))
    if not os.environ.get("ADQUEUE_TORCH_THREADS"):
        os.environ["ADQUEUE_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(children, 1)))


class SqlProgress:
    """Training progress written to the job row (phase, counts, heartbeat), at most every 2 s."""

    def __init__(self, ctx: Context, job_id: int) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.name = ""
        self.total = 0
        self.done = 0
        self.info: dict[str, float] = {}
        self._last = 0.0

    def phase(self, name: str, total: int) -> None:
        self.name, self.total, self.done, self.info = name, total, 0, {}
        self._flush(force=True)

    def advance(self, n: int = 1, **info: float) -> None:
        self.done += n
        self.info.update(info)
        self._flush()

    def _flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_EVERY_S and self.done < self.total:
            return
        self._last = now
        details = " ".join(f"{key}={value:.4g}" for key, value in self.info.items())
        phase = f"{self.name} {details}".strip()[:200]
        with self.ctx.store.session() as session:
            session.execute(
                update(Job).where(Job.id == self.job_id)
                .values(phase=phase, n_total=self.total, n_done=self.done, heartbeat_at=utcnow())
            )
