"""The queue side of submitting: job ids as JSON messages to Redis, and a look into the queue.

The reconciler compares what SQL says is waiting with what the broker holds; `message_count` and
`message_ids` read kombu's Redis layout directly: each queue is a list (one per priority step),
and messages delivered but not yet acknowledged sit in the `unacked` hash.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from kombu.exceptions import OperationalError as KombuOperationalError

from adqueue.core.config import Settings
from adqueue.core.errors import BrokerUnavailable
from adqueue.workers.app import TASK_FINISH, TASK_SCORE_SHARD, TASK_TRAIN, make_app
from adqueue.workers.transport import dead_letter_list

_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 3.0}
_KINDS = {TASK_SCORE_SHARD: "shard", TASK_TRAIN: "train", TASK_FINISH: "finish"}
_PRIORITY_SEPARATOR = "\x06\x16"  # kombu names a queue's priority lists "<queue>\x06\x16<n>"
_SCAN_CHUNK = 1000


class CeleryDispatcher:
    """Sends to one queue (the settings' own, or `queue`) and reads that queue back."""

    def __init__(self, settings: Settings, queue: str | None = None) -> None:
        assert settings.broker_url is not None
        self.settings = settings
        self.queue: str | None = queue or settings.queue
        check_broker(settings.broker_url)
        self.app = make_app(settings, producer=True)
        self._redis = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=30)

    def enqueue_train(self, job_id: int) -> None:
        self._send(TASK_TRAIN, [job_id])

    def enqueue_shards(self, shard_ids: Sequence[int], *, countdown: float = 0.0) -> None:
        self._send(TASK_SCORE_SHARD, shard_ids, countdown=countdown)

    def enqueue_finish(self, job_id: int) -> None:
        self._send(TASK_FINISH, [job_id])

    def after_submit(self, job_id: int) -> None:
        pass  # workers take it from here

    def _send(self, task: str, ids: Iterable[int], countdown: float = 0.0) -> None:
        try:
            with self.app.producer_or_acquire() as producer:
                for one in ids:
                    self.app.send_task(
                        task, args=[one], queue=self.queue, producer=producer, countdown=countdown or None,
                        retry=True, retry_policy=_RETRY_POLICY,
                    )
        except (KombuOperationalError, redis.RedisError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BrokerUnavailable(f"lost the broker at {self.settings.broker_url} while sending: {reason}") from None

    def _lists(self) -> list[str]:
        assert self.queue is not None
        return [self.queue] + [f"{self.queue}{_PRIORITY_SEPARATOR}{n}" for n in range(1, 10)]

    def message_count(self) -> int:
        """Messages waiting in the queue plus those delivered to a worker and not yet acknowledged."""
        pipe = self._redis.pipeline()
        for key in self._lists():
            pipe.llen(key)
        waiting = sum(pipe.execute())
        return waiting + sum(1 for _ in self._unacked())

    def message_ids(self) -> dict[str, set[int]]:
        """The ids (shard or job) each waiting or unacknowledged message of this queue carries."""
        found: dict[str, set[int]] = {kind: set() for kind in _KINDS.values()}
        for message in self._waiting():
            _collect(message, found)
        for message in self._unacked():
            _collect(message, found)
        return found

    def dead_letters(self) -> int:
        """Entries the workers moved aside as malformed (workers/transport.py)."""
        assert self.queue is not None
        return int(self._redis.llen(dead_letter_list(self.queue)))

    def _waiting(self) -> Iterable[Any]:
        for key in self._lists():
            start = 0
            while chunk := self._redis.lrange(key, start, start + _SCAN_CHUNK - 1):
                yield from (_parsed(raw) for raw in chunk)
                start += _SCAN_CHUNK

    def _unacked(self) -> Iterable[Any]:
        for raw in self._redis.hvals("unacked"):
            entry = _parsed(raw)
            if isinstance(entry, list) and len(entry) == 3 and entry[2] == self.queue:
                yield entry[0]


def _parsed(raw: bytes | str) -> Any:
    """A queue entry as JSON; None for one that is not (anyone can push anything onto a list)."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _collect(message: Any, found: dict[str, set[int]]) -> None:
    headers = message.get("headers") if isinstance(message, dict) else None
    kind = _KINDS.get(headers.get("task", "")) if isinstance(headers, dict) else None
    if kind is None:
        return  # not one of our messages: counted as waiting, never parsed further
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        found[kind].add(int(args[0]))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        pass  # not one of ours after all


def check_broker(url: str) -> None:
    """Fail in seconds with a clear message rather than hang on an unreachable broker."""
    try:
        redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5).ping()
    except (redis.RedisError, OSError) as exc:
        raise BrokerUnavailable(f"cannot reach the broker at {url}: {exc}") from None
