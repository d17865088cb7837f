"""The submitting side of the queue: shard and train job ids, as JSON messages, to Redis."""

from __future__ import annotations

import redis

from adqueue.config import Settings
from adqueue.errors import BrokerUnavailable
from workers.app import TASK_SCORE_SHARD, TASK_TRAIN, make_app

_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 3.0}


class CeleryDispatcher:
    def __init__(self, settings: Settings) -> None:
        assert settings.broker_url is not None
        self.settings = settings
        check_broker(settings.broker_url)
        self.app = make_app(settings)

    def enqueue_train(self, job_id: int) -> None:
        self._send(TASK_TRAIN, [job_id])

    def enqueue_shards(self, shard_ids: list[int]) -> None:
        self._send(TASK_SCORE_SHARD, shard_ids)

    def after_submit(self, job_id: int) -> None:
        pass  # workers take it from here

    def _send(self, task: str, ids: list[int]) -> None:
        with self.app.producer_or_acquire() as producer:
            for one in ids:
                self.app.send_task(
                    task, args=[one], queue=self.settings.queue, producer=producer,
                    retry=True, retry_policy=_RETRY_POLICY,
                )


def check_broker(url: str) -> None:
    """Fail in seconds with a clear message rather than hang on an unreachable broker."""
    try:
        redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5).ping()
    except (redis.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"cannot reach the broker at {url}: {exc}") from None
