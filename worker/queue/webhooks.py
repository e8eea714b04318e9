"""Webhooks: signed, at-least-once notifications, delivered by ``genq notifier``.

Events are written atomically with the state change that causes them: the result store's
finish script pushes ``generation`` events (a request with a ``webhook_url``, or any request
outside a job while ``GENQ_WEBHOOK_URL`` is set) and ``job`` events (a job whose last request
just ended) onto the Redis list ``genq:events``, and an OpenAI batch that ends while
``validating`` pushes a ``batch`` event in the transaction that ends it (``batch_ended``).
The notifier moves each event to a pending list, turns it into one Celery task per target URL
on the light ``genq.webhooks`` queue, and only then drops it (a notifier killed in between
re-reads the pending list at start: at least once). The task signs the body per the Standard
Webhooks spec (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``; the id is stable
across retries, so receivers can drop duplicates) and POSTs it, retrying with exponential backoff for up to
``GENQ_WEBHOOK_MAX_AGE_S``. The GPU worker's loop never delivers anything.

SSRF guard: only http(s) URLs whose host resolves to public addresses, unless
``GENQ_WEBHOOK_ALLOW_PRIVATE=1`` (loopback, link-local, private, reserved and multicast
addresses are refused otherwise, at delivery time, after resolution). The host is resolved
once per attempt and the POST goes to an address that was checked (the Host header and TLS
server name stay the URL's host): a name that resolves elsewhere the second time (DNS
rebinding) cannot redirect it.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import random
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from standardwebhooks.webhooks import Webhook

from worker.errors import NotFound
from worker.lifecycle import BATCH_FINAL, batch_status, job_counts, job_event, request_event
from worker.ops.redisconn import connect
from worker.ops.settings import Settings, get_settings
from worker.queue.scripts import source

log = structlog.get_logger(__name__)

EVENTS_KEY = "genq:events"
PENDING_KEY = "genq:events:pending"
GLOBAL_KEY = "genq:webhooks:global"  # present while GENQ_WEBHOOK_URL is configured
WEBHOOK_QUEUE = "genq.webhooks"
TASK = "genq.webhook"
MAX_BACKOFF_S = 30  # under the broker's visibility timeout: a held retry is never redelivered


class UnsafeURL(ValueError):
    """A webhook URL that is not http(s) or points at a non-public address."""


def check_url(url: str, allow_private: bool, resolve: bool = True) -> list[str]:
    """Refuse a webhook target that is not http(s), or (unless ``allow_private``) whose host is
    or resolves to a loopback, link-local, private, reserved or multicast address; return the
    addresses judged, the only ones to connect to. Without ``resolve`` (at enqueue) only a
    literal address is judged; names are judged at delivery. A name that does not resolve
    raises ``httpx.ConnectError`` (retried, as any failed connection)."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise UnsafeURL(f"webhook URL must be http(s) with a host: {url[:100]!r}")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:  # a name
        if not resolve:
            return []
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise httpx.ConnectError(f"webhook host {host!r} does not resolve") from exc
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    for address in addresses:
        if not allow_private and (not address.is_global or address.is_multicast):
            raise UnsafeURL(f"webhook host {host!r} is not a public address ({address}); "
                            "set GENQ_WEBHOOK_ALLOW_PRIVATE=1 to allow it")
    return [str(address) for address in addresses]


def post(url: str, addresses: list[str], body: str, headers: dict[str, str]) -> int:
    """POST ``body`` to the first of ``addresses`` that takes the connection, never to a fresh
    resolution of the URL's host (its Host header and TLS server name are kept); the status."""
    target = httpx.URL(url)
    headers = {**headers, "host": target.netloc.decode("ascii")}
    sni = {"sni_hostname": target.raw_host.decode("ascii")}
    with httpx.Client(timeout=10, follow_redirects=False) as client:
        for address in addresses[:-1]:
            with contextlib.suppress(httpx.ConnectError):
                return client.post(target.copy_with(host=address), content=body, headers=headers,
                                   extensions=sni).status_code
        return client.post(target.copy_with(host=addresses[-1]), content=body, headers=headers,
                           extensions=sni).status_code


def event_id(kind: str, subject: str) -> str:
    """The id of the one event ``kind`` about ``subject`` (the same on every redelivery)."""
    return "evt_" + hashlib.sha256(f"{kind}:{subject}".encode()).hexdigest()[:24]


def build_event(raw: str, store) -> tuple[str, dict[str, Any], str | None] | None:
    """(event id, payload, its own target URL or None) for an event from the finish script."""
    note = json.loads(raw)
    now = datetime.now(UTC).isoformat()
    if note["type"] == "generation":
        record = store.get_many([note["id"]])[0]
        if record is None:
            return None
        kind = request_event(record["status"])
        data = {k: v for k, v in record.items() if k not in ("job_id", "expires_at")}
        return event_id(kind, note["id"]), {"type": kind, "timestamp": now, "data": data}, \
            note.get("url") or None
    if note["type"] == "batch":
        return _batch_event(note["id"], store, now)
    try:
        job = store.job(note["id"])
    except NotFound:  # expired before its event was sent
        return None
    hook, batch = store.redis.hmget(f"genq:job:{note['id']}", ["webhook", "batch"])
    data = {"id": job["id"], "object": "job", "status": job["status"], "counts": job["counts"]}
    if batch:  # an OpenAI batch: its id and status, as OpenAI's batch events carry them
        data = {"id": batch, "object": "batch", "status": ended_batch_status(store.redis, batch, job),
                "job_id": job["id"], "counts": job["counts"]}
    kind = job_event(data["status"])
    return event_id(kind, note["id"]), {"type": kind, "timestamp": now, "data": data}, hook


def _batch_event(batch_id: str, store, now: str) -> tuple[str, dict[str, Any], None] | None:
    """The event of a batch that ended while ``validating``: the payload and id the job's
    event would have (no job, or one that never left ``validating``: zero counts or its own)."""
    from worker.compat.batch_records import batch_key

    raw = store.redis.get(batch_key(batch_id))
    if raw is None:  # expired before its event was sent
        return None
    record = json.loads(raw)
    try:
        counts = store.job(record["job_id"])["counts"]
    except NotFound:  # failed before its job was made
        counts = job_counts({}, 0)
    kind = job_event(record["status"])
    data = {"id": batch_id, "object": "batch", "status": record["status"],
            "job_id": record["job_id"], "counts": counts}
    return event_id(kind, record["job_id"]), {"type": kind, "timestamp": now, "data": data}, None


def batch_ended(pipe, batch_id: str, job_id: str, ttl_s: int) -> None:
    """Queue on ``pipe``, in the transaction that ends a batch still ``validating``, its
    webhook event (once per batch: ``lua/batch_ended.lua``)."""
    from worker.compat.batch_records import batch_key
    from worker.queue.rediskeys import job_key

    pipe.register_script(source("batch_ended"))(
        keys=[f"{batch_key(batch_id)}:notified", job_key(job_id)], args=[batch_id, ttl_s],
        client=pipe)


def ended_batch_status(redis, batch_id: str, job: dict[str, Any]) -> str:
    """The status an OpenAI batch whose job ended reads: its own once final, else the one
    ``compat.batches`` ends it with on its next read (``lifecycle.batch_status``)."""
    from worker.compat.batch_records import batch_key

    raw = redis.get(batch_key(batch_id))
    record = json.loads(raw) if raw else {}
    if record.get("status") in BATCH_FINAL:
        return record["status"]
    return batch_status(record.get("ending"), job["status"], job["counts"]["expired"])


def register(app, settings: Settings) -> None:
    """Add the delivery task to a Celery app."""

    @app.task(name=TASK, bind=True, max_retries=None, acks_late=True, ignore_result=True,
              shared=False)  # its settings are this app's
    def deliver(self, url: str, msg_id: str, body: str, first_at: float) -> None:
        target = _origin(url)  # what logs show: a path or query may hold the receiver's token
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        now = datetime.now(UTC)  # one instant for the header and the signature
        headers = {"content-type": "application/json", "webhook-id": msg_id,
                   "webhook-timestamp": str(int(now.timestamp()))}
        if secret:
            headers["webhook-signature"] = Webhook(secret).sign(msg_id, now, body)
        try:
            status, error = post(url, check_url(url, settings.webhook_allow_private), body,
                                 headers), None
        except UnsafeURL as exc:
            log.error("webhook_refused", target=target, event_id=msg_id, reason=str(exc))
            return
        except httpx.HTTPError as exc:
            status, error = None, repr(exc)[:200]
        if status is not None and 200 <= status < 300:
            log.info("webhook_delivered", target=target, event_id=msg_id, attempt=self.request.retries + 1)
            return
        if time.time() - first_at > settings.webhook_max_age_s:
            log.error("webhook_abandoned", target=target, event_id=msg_id, status=status, error=error)
            return
        delay = min(2 ** self.request.retries, MAX_BACKOFF_S) * (0.8 + 0.4 * random.random())
        log.warning("webhook_retry", target=target, event_id=msg_id, status=status, error=error,
                    retry_in_s=round(delay, 1))
        raise self.retry(countdown=delay)


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL (never its user info, path or query)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"
    except ValueError:
        return "(unparseable URL)"


class Pump:
    """Turns events from the finish script into delivery tasks (the notifier's thread)."""

    def __init__(self, app, settings: Settings):
        from worker.queue.results import ResultStore

        self.app = app
        self.settings = settings
        self.store = ResultStore(settings.result_backend_url, settings.result_ttl_s, settings)
        self.redis = connect(settings.result_backend_url, settings, decode_responses=True,
                             socket_timeout=10)
        self.stop = threading.Event()

    def run(self) -> None:
        """Until stopped: recover pending events, then move, publish and drop each event."""
        while not self.stop.is_set():
            try:
                while self.redis.lmove(PENDING_KEY, EVENTS_KEY, "RIGHT", "RIGHT"):
                    pass  # a notifier stopped mid-event: do it again (at least once)
                announce_global_hook(self.redis, self.settings, authority=True)
                while not self.stop.is_set():
                    raw = self.redis.blmove(EVENTS_KEY, PENDING_KEY, 1.0, "RIGHT", "LEFT")
                    if raw is not None:
                        self.publish(raw)
                        self.redis.lrem(PENDING_KEY, 1, raw)
            except Exception as exc:  # noqa: BLE001 - Redis, kombu's publish: retry, never die
                log.warning("notifier_retry", component="notifier", error=repr(exc)[:200])
                self.stop.wait(1.0)

    def publish(self, raw: str) -> None:
        """One delivery task per target of the event ``raw``."""
        built = build_event(raw, self.store)
        if built is None:
            return
        msg_id, payload, own = built
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        targets = {u for u in (own, self.settings.webhook_url) if u}
        for url in sorted(targets):
            self.app.send_task(TASK, args=[url, msg_id, body, time.time()], queue=WEBHOOK_QUEUE,
                               ignore_result=True)
        log.info("webhook_event", event_id=msg_id, type=payload["type"], targets=len(targets))


def announce_global_hook(client, settings: Settings, authority: bool = False) -> None:
    """Record in Redis that ``GENQ_WEBHOOK_URL`` is configured, with no expiry: the finish
    script creates events for it whether or not a notifier runs now, and a notifier delivers
    them once it runs. Workers and the notifier record it at start; the notifier
    (``authority``) also removes it when it has no URL (the hook was switched off)."""
    if settings.webhook_url:
        client.set(GLOBAL_KEY, 1)
    elif authority:
        client.delete(GLOBAL_KEY)


def run_notifier(name: str | None = None) -> int:
    """``genq notifier``: the event pump plus a small Celery worker on ``genq.webhooks``."""
    from worker.ops.logging import configure_logging
    from worker.queue.app import make_app

    settings = get_settings()
    configure_logging(settings.log_level)
    app = make_app(settings)
    register(app, settings)
    pump = Pump(app, settings)
    thread = threading.Thread(target=pump.run, name="genq-events", daemon=True)
    thread.start()
    name = name or f"notifier@{socket.gethostname()}"
    from worker.queue.intake import start_intake

    stop_intake = start_intake(settings, name)  # foreign producers' requests (worker.queue.intake)
    worker = app.Worker(hostname=name, pool="threads",
                        concurrency=4, queues=[WEBHOOK_QUEUE], loglevel=settings.log_level,
                        without_mingle=True, without_gossip=True)
    worker.start()
    pump.stop.set()
    stop_intake.set()
    return worker.exitcode or 0
