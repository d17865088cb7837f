"""kombu's Redis transport, made to survive what a queue should never hold.

Anything can `LPUSH` onto a Redis list. kombu decodes each entry as JSON and then as a message
envelope (a dict with `properties`, `body`, `headers`) before Celery sees it; an entry that is
neither (`[1,2,3]`, a plain string) raises out of the worker's event loop, and Celery stops the
worker as an "unrecoverable error". Here such an entry is moved aside, as it was, onto the
dead-letter list `<queue>.dead` (`adqueue reconcile` counts it), with one line in the log, and
the worker goes on. Messages that are envelopes but not our tasks are Celery's to reject.

The worker's app selects this class (workers/app.py); senders and Flower keep plain `redis://`.
"""

from __future__ import annotations

import json
import logging
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

DEAD_SUFFIX = ".dead"


def dead_letter_list(queue: str) -> str:
    return f"{queue}{DEAD_SUFFIX}"


def _raw(entry: Any) -> str:
    return entry if isinstance(entry, str) else dumps(entry)


class TolerantChannel(kombu_redis.Channel):
    def _dead_letter(self, queue: str, raw: str, why: str) -> None:
        log.error("moved a malformed entry of queue %r to %r (%s): %.200r", queue, dead_letter_list(queue), why, raw)
        with self.conn_or_acquire() as client:
            client.lpush(dead_letter_list(queue), raw)

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except json.JSONDecodeError as exc:
            # kombu popped the entry and failed on it at once; its queue is the one it just moved
            # to the end of its round-robin cycle.
            self._dead_letter(self._queue_cycle.items[-1], exc.doc, "not JSON")
            return True

    def _get(self, queue: str, timeout: Any = None) -> Any:
        try:
            return super()._get(queue)
        except json.JSONDecodeError as exc:
            self._dead_letter(queue, exc.doc, "not JSON")
            raise Empty() from None

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any) -> Any:
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        deliver = self.connection._callbacks[queue]

        def checked(raw_message: Any) -> Any:
            try:  # the envelope kombu builds before anything is acknowledged or run
                self.Message(raw_message, channel=self)
            except Exception as exc:  # noqa: BLE001 - whatever the entry is, it is not a message
                self._dead_letter(queue, _raw(raw_message), f"not a message: {type(exc).__name__}: {exc}")
                return None
            return deliver(raw_message)

        self.connection._callbacks[queue] = checked
        return result


class TolerantTransport(kombu_redis.Transport):
    Channel = TolerantChannel


TRANSPORT = f"{__name__}:TolerantTransport"
