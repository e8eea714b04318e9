"""The atomic fetch records messages exactly as kombu does, so kombu's own restore brings
back what a dead worker held, and JSON is the only content accepted (real Redis, real kombu)."""

from __future__ import annotations

import time

import pytest
import redis
from kombu import Connection

from worker.queue.app import REQUEST_QUEUES, transport_options
from worker.queue.delivery import Inbox, Undecodable


def test_fetched_then_abandoned_messages_are_restored_by_kombu(client, redis_url):
    settings = client.settings.model_copy(update={"visibility_timeout_s": 2})
    options = transport_options(settings)
    broker = redis.Redis.from_url(redis_url)
    inbox = Inbox(broker, REQUEST_QUEUES, options)
    ids = [client.submit(prompt=f"p{i}", max_new_tokens=2) for i in range(3)]
    bulk = client.submit(prompt="bulk one", priority="bulk")
    held, _ = inbox.fetch(dict.fromkeys(REQUEST_QUEUES, 10))
    assert [d.queue for d in held] == ["genq.interactive"] * 3 + ["genq.bulk"]  # priority order
    body, headers = held[0].decode()
    assert headers["id"] == ids[0] and body[0][0]["prompt"] == "p0"
    assert broker.llen("genq.interactive") == 0 and broker.hlen("unacked") == 4
    inbox.ack(held[:1])
    assert broker.hlen("unacked") == 3 and broker.zcard("unacked_index") == 3
    time.sleep(2.5)  # the holder "died": kombu's visibility-timeout restore takes over
    with Connection(redis_url, transport_options=options) as conn:
        channel = conn.default_channel
        channel.qos.restore_visible(num=None, interval=1)
    assert broker.hlen("unacked") == 0
    again, _ = inbox.fetch(dict.fromkeys(REQUEST_QUEUES, 10))
    assert sorted(d.decode()[1]["id"] for d in again) == sorted([*ids[1:], bulk])


def test_only_json_messages_decode(redis_url):
    with Connection(redis_url) as conn:
        conn.Producer().publish({"x": 1}, routing_key="genq.bulk", exchange="",
                                serializer="pickle")
    inbox = Inbox(redis.Redis.from_url(redis_url), REQUEST_QUEUES, {})
    [delivery], _ = inbox.fetch(dict.fromkeys(REQUEST_QUEUES, 5))
    with pytest.raises(Undecodable, match="never pickle"):
        delivery.decode()
