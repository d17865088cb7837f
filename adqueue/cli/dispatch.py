"""Which dispatcher a CLI verb sends its work through: Celery with a broker, this process without."""

from __future__ import annotations

from collections.abc import Callable

from adqueue.core.progress import Progress
from adqueue.jobs.context import Context
from adqueue.jobs.ports import Dispatcher, ScoreProgress


def make_dispatcher(
    ctx: Context,
    *,
    train_progress: Callable[[], Progress],
    score_progress: Callable[[], ScoreProgress],
) -> Dispatcher:
    if ctx.settings.embedded:
        from adqueue.runners.inline import InlineDispatcher

        inline = InlineDispatcher(ctx, train_progress=train_progress, score_progress=score_progress)
        inline.device  # noqa: B018 - a device that is not there fails now, before anything is submitted
        return inline
    from adqueue.workers.producer import CeleryDispatcher  # the queue side, only when a broker is set

    return CeleryDispatcher(ctx.settings)
