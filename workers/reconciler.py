"""The reconciler, run periodically inside every worker: no extra process to remember.

A daemon thread in each process that runs tasks (the solo worker itself, or each prefork child)
runs one reconcile pass every `reconcile_interval_s` (with jitter, so a fleet does not pass in
lockstep). Passes from many workers at once are safe: every change is a guarded statement.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from typing import Any

from celery.signals import worker_process_init, worker_ready

from adqueue.jobs.reconcile import reconcile
from adqueue.workers import metrics
from adqueue.workers.producer import CeleryDispatcher
from adqueue.workers.runtime import current_runtime

log = logging.getLogger(__name__)


def _loop(queues: list[str], stop: threading.Event) -> None:
    runtime = current_runtime()
    interval = runtime.settings.reconcile_interval_s
    dispatchers: dict[str | None, Any] = {}
    while not stop.wait(interval * random.uniform(0.8, 1.2)):
        try:
            for queue in queues:
                if queue not in dispatchers:
                    dispatchers[queue] = CeleryDispatcher(runtime.settings, queue)
            report = reconcile(runtime.ctx, dispatchers, worker=f"reconciler-{runtime.name}")
            metrics.reconciled(report.as_dict(), runtime.name)
            runtime.notifier.kick()  # ends this pass brought (or any other process left owed)
        except Exception:
            log.warning("reconciler pass failed; trying again in %.0f s", interval, exc_info=True)


def start(queues: list[str]) -> threading.Event:
    stop = threading.Event()
    threading.Thread(target=_loop, args=(queues, stop), name="adqueue-reconciler", daemon=True).start()
    return stop


def _queues() -> list[str]:
    return [q for q in os.environ.get("ADQUEUE_WORKER_QUEUES", "").split(",") if q] or [current_runtime().settings.queue]


@worker_ready.connect
def _solo_worker_ready(**_: Any) -> None:
    if int(os.environ.get("ADQUEUE_WORKER_CONCURRENCY", "1")) == 1:
        start(_queues())


@worker_process_init.connect
def _prefork_child(**_: Any) -> None:
    start(_queues())
