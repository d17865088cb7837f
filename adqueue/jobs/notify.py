"""Telling people a job ended: its alarms, and a JSON POST to each ADQUEUE_NOTIFY_URL.

Whoever notices an ended job first does it: the worker that ended it (a background thread, so a
slow webhook never holds a task), any worker's reconciler pass, or the CLI that ran or cancelled
it. Each end is claimed attempt by attempt in SQL (adqueue/store/notifications.py), so it is sent
once however many notice it; a URL that took it is not sent it again. A failed attempt is
retried after notify_retry_delay_s, then 4x longer each time, up to notify_attempts; then one
warning line per URL is logged and the end is settled. The job's own status never depends on
any of this.

With no URL configured, the alarms are still computed and stored (the pages and `adqueue jobs`
show them); nothing is sent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from adqueue.core.clock import aware, utcnow
from adqueue.jobs.alarms import Calibration, job_alarms
from adqueue.jobs.context import Context
from adqueue.jobs.drift import drift
from adqueue.store.notifications import (
    JobFacts,
    claim_notification,
    job_facts,
    next_notification_due,
    owed_notifications,
    retry_notification,
    settle_notification,
    store_alarms,
)

log = logging.getLogger(__name__)

POST_TIMEOUT_S = 10.0
MAX_RETRY_DELAY_S = 3600.0

Post = Callable[[str, bytes], None]


def post_json(url: str, body: bytes) -> None:
    """POST `body` as JSON; raise unless the receiver answers 2xx."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "adqueue-notify"})
    with urllib.request.urlopen(request, timeout=POST_TIMEOUT_S) as response:
        if not 200 <= response.status < 300:
            raise urllib.error.HTTPError(url, response.status, response.reason, response.headers, None)


def payload(ctx: Context, facts: JobFacts, alarms: list[dict[str, str]], drift_ks: float | None) -> dict[str, Any]:
    """The notification's JSON: the job's outcome, its alarms, a one-line `text` (what Slack and
    Teams incoming webhooks display) and a link to its page when ADQUEUE_PUBLIC_URL is set."""
    calibration = Calibration.of_model(facts.model_params, facts.threshold)
    rate = facts.n_flagged / facts.n_scored if facts.n_scored else None
    url = f"{ctx.settings.public_url}/jobs/{facts.job_id}" if ctx.settings.public_url else None
    counts = (f"{facts.n_scored} scored, {facts.n_flagged} flagged, {facts.n_errors} unreadable of {facts.n_total}"
              if facts.kind != "train" else f"{facts.n_done} training images")
    text = f"adqueue {facts.kind} job {facts.job_id} {facts.status}" + (f" ({facts.model})" if facts.model else "")
    text += f": {counts}" + "".join(f"\n{a['kind']}: {a['message']}" for a in alarms) + (f"\n{url}" if url else "")
    return {
        "job_id": facts.job_id, "kind": facts.kind, "status": facts.status, "model": facts.model,
        "source": facts.source, "n_total": facts.n_total, "n_scored": facts.n_scored, "n_flagged": facts.n_flagged,
        "n_errors": facts.n_errors, "anomaly_rate": rate, "threshold": facts.threshold,
        "target_fpr": calibration.fpr if calibration else None,
        "n_calibration": calibration.n_images if calibration else None, "drift_ks": drift_ks,
        "error": facts.error, "finished_at": aware(facts.finished_at).isoformat() if facts.finished_at else None,
        "url": url, "alarms": alarms, "text": text,
    }


def _alarms_of(ctx: Context, facts: JobFacts) -> tuple[list[dict[str, str]], float | None]:
    calibration = Calibration.of_model(facts.model_params, facts.threshold)
    cal_scores = [float(s) for s in ((facts.model_params or {}).get("calibration") or {}).get("scores") or []
                  if isinstance(s, (int, float))]
    cal_normal = [s for s in cal_scores if facts.threshold is None or s <= facts.threshold]
    shift = drift(facts.normal_sample, cal_normal, n_night=facts.n_normal) if facts.kind == "score" else None
    alarms = job_alarms(kind=facts.kind, status=facts.status, error=facts.error, n_total=facts.n_total,
                        n_scored=facts.n_scored, n_flagged=facts.n_flagged, n_errors=facts.n_errors,
                        calibration=calibration, drift=shift, error_share=ctx.settings.alarm_error_share)
    return [a.as_dict() for a in alarms], shift.statistic if shift else None


def retry_delay(ctx: Context, attempt: int) -> float:
    return min(ctx.settings.notify_retry_delay_s * 4 ** (attempt - 1), MAX_RETRY_DELAY_S)


def notify_one(ctx: Context, job_id: int, *, post: Post = post_json, now: datetime | None = None) -> bool:
    """One attempt at one job end's notification; False if another sender holds it or it is not due."""
    now = now or utcnow()
    urls = ctx.settings.notify_urls
    hold = timedelta(seconds=POST_TIMEOUT_S * (len(urls) + 1) + 30)
    with ctx.store.session() as session:
        claimed = claim_notification(session, job_id, now, now + hold)
    if claimed is None:
        return False
    notification = claimed.notification
    if claimed.attempt == 1 or "payload" not in notification:
        with ctx.store.session() as session:
            facts = job_facts(session, job_id)
        if facts is None:
            return False
        alarms, drift_ks = _alarms_of(ctx, facts)
        notification = {"payload": payload(ctx, facts, alarms, drift_ks), "sent": []}
        with ctx.store.session() as session:
            store_alarms(session, claimed, alarms, drift_ks)
    sent: list[str] = list(notification.get("sent") or [])
    body = json.dumps(notification["payload"], default=str).encode()
    errors: dict[str, str] = {}
    for url in urls:
        if url in sent:
            continue
        try:
            post(url, body)
            sent.append(url)
        except Exception as exc:  # noqa: BLE001 - any failure of a webhook is retried, never raised into a job
            errors[url] = str(getattr(exc, "reason", None) or exc)
    notification = {**notification, "sent": sent, "errors": errors}
    with ctx.store.session() as session:
        if not errors or claimed.attempt >= ctx.settings.notify_attempts:
            for url, error in errors.items():
                log.warning("job %s: notification to %s failed after %d attempt(s), given up: %s",
                            job_id, url, claimed.attempt, error)
            settle_notification(session, claimed, notification, utcnow())
        else:
            log.debug("job %s: notification attempt %d failed: %s", job_id, claimed.attempt, errors)
            retry_notification(session, claimed, notification,
                               utcnow() + timedelta(seconds=retry_delay(ctx, claimed.attempt)))
    return True


def notify_owed(ctx: Context, *, post: Post = post_json) -> int:
    """One attempt at every job end that is owed one and due now; how many were attempted."""
    with ctx.store.session() as session:
        owed = owed_notifications(session, utcnow())
    return sum(notify_one(ctx, job_id, post=post) for job_id in owed)


def seconds_to_next(ctx: Context) -> float | None:
    with ctx.store.session() as session:
        due = next_notification_due(session)
    return None if due is None else max(0.0, (aware(due) - utcnow()).total_seconds())


def notify_until_settled(ctx: Context, *, budget_s: float = 15.0, post: Post = post_json) -> None:
    """For a process about to exit (the CLI): attempts, with their backoff, for at most `budget_s`;
    what is left is retried by the next reconciler pass (a worker's, or `adqueue reconcile`)."""
    deadline = time.monotonic() + budget_s
    try:
        while True:
            notify_owed(ctx, post=post)
            wait = seconds_to_next(ctx)
            if wait is None or time.monotonic() + wait > deadline:
                return
            time.sleep(wait + 0.01)
    except Exception:
        log.warning("notifications could not be sent now; a reconciler retries them", exc_info=True)


class Notifier:
    """A worker's background sender: woken when a task or a reconciler pass may have ended a job,
    and again when a retry falls due."""

    def __init__(self, ctx: Context, *, post: Post = post_json) -> None:
        self.ctx = ctx
        self.post = post
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="adqueue-notifier", daemon=True)
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        wait: float | None = None
        while True:
            self._wake.wait(timeout=wait)
            self._wake.clear()
            try:
                notify_owed(self.ctx, post=self.post)
                wait = seconds_to_next(self.ctx)
            except Exception:
                log.warning("notifier pass failed", exc_info=True)
                wait = self.ctx.settings.reconcile_interval_s
