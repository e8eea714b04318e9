"""Requests published without kombu's per-message path are the messages kombu would write."""

from __future__ import annotations

import base64
import json

import redis

from worker.queue.app import TASK_NAME
from worker.queue.delivery import KOMBU_CHECKED
from worker.queue.messages import headers_for, parse
from worker.queue.publishing import publish, wrap


def _kombu_message(client, r, request_id: str, request: dict, queue: str, headers: dict) -> dict:
    """What ``app.send_task`` (kombu's Redis transport) LPUSHes for the same request."""
    with client.app.producer_or_acquire() as producer:
        client.app.send_task(TASK_NAME, args=[request], task_id=request_id, producer=producer,
                             queue=queue, retry=False, headers=headers, ignore_result=True,
                             argsrepr=f"<request {request_id}>", kwargsrepr="{}")
    return json.loads(r.rpop(queue))


def test_wrap_writes_what_kombu_writes(client, redis_url):
    import kombu

    assert kombu.__version__.startswith(KOMBU_CHECKED), (
        f"kombu {kombu.__version__}: check worker.queue.publishing.wrap against it, then add "
        "it to KOMBU_CHECKED")
    r = redis.Redis.from_url(redis_url)
    request = {"messages": [{"role": "user", "content": "ünï 🚀"}], "max_new_tokens": 3,
               "priority": "bulk", "expires_in_s": 30}
    headers = headers_for("job-1", 1700000000.5, 30, "owner-a", 3, "pirate")
    ours = json.loads(wrap(client.app, "rid-1", request, "genq.bulk.owner-a", headers))
    theirs = _kombu_message(client, r, "rid-1", request, "genq.bulk.owner-a", headers)
    for message in (ours, theirs):
        assert message["properties"].pop("delivery_tag")
    assert ours == theirs
    assert json.loads(base64.b64decode(ours["body"])) == [[request], {}, {
        "callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def test_published_requests_read_back_in_order_on_their_lists(client, redis_url):
    """``publish`` puts each request on its priority's list (an owner's bulk list its own),
    oldest first out, readable by the worker's parser with genqueue's headers."""
    r = redis.Redis.from_url(redis_url)
    items = [(f"id-{i}", {"prompt": f"p{i}", "max_new_tokens": 2,
                          "priority": "bulk" if i % 2 else "interactive"}) for i in range(600)]
    publish(client.app, client.publisher, items, "job-9", owner="o1", weight=2)
    assert r.llen("genq.interactive") == 300 and r.llen("genq.bulk.o1") == 300
    assert r.hget("genq:bulk:weights", "genq.bulk.o1") == b"2"
    first = json.loads(r.rpop("genq.bulk.o1"))
    envelope = parse(json.loads(base64.b64decode(first["body"])), first["headers"])
    assert (envelope.id, envelope.request["prompt"], envelope.job_id, envelope.owner,
            envelope.weight, envelope.foreign) == ("id-1", "p1", "job-9", "o1", 2, False)
    assert json.loads(r.lindex("genq.interactive", 0))["headers"]["id"] == "id-598"
