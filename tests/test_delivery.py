"""The atomic fetch records messages exactly as kombu does, so kombu's own restore brings
back what a dead worker held, and JSON is the only content accepted (real Redis, real kombu)."""

from __future__ import annotations

import time

import pytest
import redis
from kombu import Connection

from worker.ops.settings import Settings
from worker.queue.app import REQUEST_QUEUES, kombu_queue, transport_options
from worker.queue.delivery import Inbox, Undecodable


def test_fetched_then_abandoned_messages_are_restored_by_kombu(client, redis_url):
    settings = client.settings.model_copy(update={"visibility_timeout_s": 2})
    options = transport_options(settings)
    broker = redis.Redis.from_url(redis_url)
    inbox = Inbox(broker, options)
    ids = [client.submit(prompt=f"p{i}", max_new_tokens=2) for i in range(3)]
    bulk = client.submit(prompt="bulk one", priority="bulk")
    owned = client.as_owner("team-a").submit(prompt="an owner's bulk one", priority="bulk")
    held, _ = inbox.fetch(dict.fromkeys(REQUEST_QUEUES, 10))
    assert [d.queue for d in held] == ["genq.interactive"] * 3 + ["genq.bulk", "genq.bulk.team-a"]
    body, headers = held[0].decode()
    assert headers["id"] == ids[0] and body[0][0]["prompt"] == "p0"
    assert broker.llen("genq.interactive") == 0 and broker.hlen("unacked") == 5
    inbox.ack(held[:1])
    assert broker.hlen("unacked") == 4 and broker.zcard("unacked_index") == 4
    time.sleep(2.5)  # the holder "died": kombu's visibility-timeout restore takes over
    with Connection(redis_url, transport_options=options) as conn:
        channel = conn.default_channel
        channel.qos.restore_visible(num=None, interval=1)
    assert broker.hlen("unacked") == 0
    assert broker.llen("genq.bulk.team-a") == 1  # back on its owner's list
    again, _ = inbox.fetch(dict.fromkeys(REQUEST_QUEUES, 10))
    assert sorted(d.decode()[1]["id"] for d in again) == sorted([*ids[1:], bulk, owned])


def test_only_json_messages_decode(redis_url):
    with Connection(redis_url) as conn:
        conn.Producer().publish({"x": 1}, routing_key="genq.bulk", exchange="",
                                serializer="pickle")
    inbox = Inbox(redis.Redis.from_url(redis_url), {})
    [delivery], _ = inbox.fetch(dict.fromkeys(REQUEST_QUEUES, 5))
    with pytest.raises(Undecodable, match="never pickle"):
        delivery.decode()


def test_the_unacked_record_is_the_one_kombu_writes(redis_url):
    """Contract with the installed kombu: a message taken by our fetch script is recorded in
    kombu's unacked hash and index exactly as kombu's own consumer records it."""
    import json

    options = transport_options(Settings(broker_url=redis_url))
    broker = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport_options=options) as conn:
        producer = conn.Producer()
        for i in range(2):
            producer.publish({"n": i}, routing_key="genq.bulk", exchange="genq.bulk",
                             declare=[kombu_queue("genq.bulk")], serializer="json")
        theirs = conn.default_channel.basic_get("genq.bulk", no_ack=False)  # kombu records it
        [ours], _ = Inbox(broker, options).fetch({"genq.bulk": 1})
        assert broker.zcard(options.get("unacked_index_key", "unacked_index")) == 2
        records = {k.decode(): json.loads(v) for k, v in broker.hgetall("unacked").items()}
        kombu_record, our_record = records[theirs.delivery_tag], records[ours.tag]
        assert [type(x) for x in our_record] == [type(x) for x in kombu_record]
        assert our_record[1:] == kombu_record[1:]  # exchange, routing key
        assert set(our_record[0]) == set(kombu_record[0])  # the same message fields
        assert json.loads(ours.raw) == our_record[0]
