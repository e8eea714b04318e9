"""Publishing requests: Celery task messages written to Redis many per round trip.

Celery builds each message (``app.amqp.create_task_message``: protocol 2, the request id as
the task id, genqueue's headers); it is then wrapped as kombu's Redis transport wraps a
message (``wrap``) and LPUSHed in a pipeline. kombu's own publish path (routing, declaring,
copying entities) costs about 0.3 ms a message, most of a big job's submit time. The wrapping
is kombu's format for the versions in ``worker.queue.delivery.KOMBU_CHECKED``;
``tests/test_publishing.py`` compares it with what kombu itself writes.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import time
import uuid
from typing import Any

from kombu.serialization import dumps

from worker.queue.app import BULK_BELL, OWNER_LISTS_KEY, TASK_NAME, pins_key, queue_for
from worker.queue.messages import headers_for

PUBLISH_BATCH = 250  # messages per pipelined round trip: bounds memory (a message holds its prompt)


def wrap(app, request_id: str, request: dict[str, Any], queue: str,
         headers: dict[str, Any]) -> str:
    """The message kombu's Redis transport would LPUSH for ``send_task(TASK_NAME,
    args=[request], task_id=request_id, queue=queue, headers=headers, ignore_result=True)``
    (no prompt text in ``argsrepr``: events and Flower show ``<request id>``). Celery's
    headers and properties are built once per app (``_template``), then given this id."""
    task_headers, properties, embed = _template(app)
    shown = {"argsrepr": f"<request {request_id}>", "kwargsrepr": "{}"}
    content_type, encoding, payload = dumps([[request], {}, embed], serializer="json")
    data = payload.encode(encoding) if isinstance(payload, str) else payload
    return json.dumps({
        "body": base64.b64encode(data).decode("ascii"),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": {**task_headers, "id": request_id, "root_id": request_id, **shown, **headers},
        "properties": {**properties, "correlation_id": request_id, **shown, "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue},
                       "priority": 0, "body_encoding": "base64",
                       "delivery_tag": str(uuid.uuid4())},
    })


@functools.cache
def _template(app) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Celery's headers, properties and canvas (``embed``) of a ``TASK_NAME`` message with no
    options: the same for every request but its id."""
    headers, properties, body, _ = app.amqp.create_task_message(
        "<id>", TASK_NAME, [None], {}, reply_to=app.thread_oid, ignore_result=True,
        argsrepr="", kwargsrepr="{}")
    return headers, properties, body[2]


def publish(app, broker, items: list[tuple[str, dict[str, Any]]], job_id: str | None,
            owner: str | None = None, weight: int = 1) -> None:
    """Publish ``(request id, request)`` pairs, ``PUBLISH_BATCH`` per round trip. An owner's
    bulk list is registered and pinned first (no fetch script drops it meanwhile:
    ``pins_key``), unpinned after, and the bulk bell rung."""
    now = time.time()
    queues = [queue_for(request.get("priority"), owner) for _, request in items]
    pins = {q: pins_key(q) for q in set(queues) if pins_key(q)}
    pin = f"publish:{uuid.uuid4()}"
    if pins:
        pipe = broker.pipeline(transaction=False)
        for key in pins.values():
            pipe.sadd(key, pin)
        pipe.hset(OWNER_LISTS_KEY, mapping=dict.fromkeys(pins, weight))
        pipe.execute()
    for at in range(0, len(items), PUBLISH_BATCH):
        pipe = broker.pipeline(transaction=False)
        part = list(zip(items[at:at + PUBLISH_BATCH], queues[at:at + PUBLISH_BATCH], strict=True))
        for queue, run in itertools.groupby(part, key=lambda pair: pair[1]):
            # one LPUSH per run of one list: the first given is the first taken
            pipe.lpush(queue, *(wrap(app, request_id, request, queue, headers_for(
                job_id, now, request.get("expires_in_s"), owner, weight, request.get("adapter")))
                for (request_id, request), _ in run))
        pipe.execute()
    if pins:
        pipe = broker.pipeline(transaction=False)
        for key in pins.values():
            pipe.srem(key, pin)
        pipe.rpush(BULK_BELL, 1)
        pipe.expire(BULK_BELL, 60)
        pipe.execute()
