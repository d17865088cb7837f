"""What a worker process keeps between tasks: settings, database, device, models, a dispatcher.

Built lazily on the first task, i.e. after any prefork fork, so a parent never opens a database
socket or a CUDA context that its children would inherit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from celery.signals import worker_process_init

from adqueue.core.config import Settings
from adqueue.jobs.context import Context
from adqueue.jobs.notify import Notifier
from adqueue.pipeline.device import apply_torch_threads, resolve_device
from adqueue.runners.models import ModelCache
from adqueue.workers.producer import CeleryDispatcher

log = logging.getLogger(__name__)


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
    def dispatcher(self) -> CeleryDispatcher:
        """Sends follow-up work (a retry, a finishing) to this worker's queue."""
        return CeleryDispatcher(self.settings)

    @cached_property
    def notifier(self) -> Notifier:
        """Sends the notifications of job ends in the background, woken after each task and pass."""
        return Notifier(self.ctx)

    @cached_property
    def name(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()  # the reconciler thread and the task thread may ask at once


def current_runtime() -> WorkerRuntime:
    global _runtime  # noqa: PLW0603 - one runtime per process, built on first use
    with _lock:
        if _runtime is None or _runtime.name != f"{socket.gethostname()}:{os.getpid()}":
            _runtime = WorkerRuntime(Settings.load())
        return _runtime


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A prefork child: start with a fresh runtime and its share of the CPU threads."""
    global _runtime  # noqa: PLW0603 - the parent's runtime must not be used after the fork
    _runtime = None
    children = int(os.environ.get("ADQUEUE_WORKER_CONCURRENCY", "1"))
    if not os.environ.get("ADQUEUE_TORCH_THREADS"):
        os.environ["ADQUEUE_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(children, 1)))
