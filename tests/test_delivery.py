"""The atomic fetch records messages exactly as kombu does, so kombu's own restore brings
back what a dead worker held, and JSON is the only content accepted (real Redis, real kombu)."""

from __future__ import annotations

import time

import pytest
import redis
from kombu import Connection

from worker.ops.settings import Settings
from worker.queue.app import (
    BULK_QUEUE,
    INTERACTIVE_QUEUE,
    OWNER_LISTS_KEY,
    PARKED_KEY,
    PARKED_LISTS_KEY,
    REQUEST_QUEUES,
    kombu_queue,
    pending_by_queue,
    pins_key,
    transport_options,
)
from worker.queue.delivery import KOMBU_CHECKED, KOMBU_UNACKED, Inbox, Undecodable
from worker.queue.link_health import drop_ended_parked


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
    assert broker.llen("genq.interactive") == 0 and broker.hlen("genq:unacked") == 5
    inbox.ack(held[:1])
    assert broker.hlen("genq:unacked") == 4 and broker.zcard("genq:unacked_index") == 4
    time.sleep(2.5)  # the holder "died": kombu's visibility-timeout restore takes over
    with Connection(redis_url, transport_options=options) as conn:
        channel = conn.default_channel
        channel.qos.restore_visible(num=None, interval=1)
    assert broker.hlen("genq:unacked") == 0
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
    """Contract with the installed kombu (``delivery.KOMBU_UNACKED``): a message taken by our
    fetch script is recorded in kombu's unacked hash and index exactly as kombu's own consumer
    records it; a kombu version it was not checked against fails here."""
    import json

    import kombu

    options = transport_options(Settings(broker_url=redis_url))
    broker = redis.Redis.from_url(redis_url)
    with Connection(redis_url, transport_options=options) as conn:
        producer = conn.Producer()
        for i in range(2):
            producer.publish({"n": i}, routing_key="genq.bulk", exchange="genq.bulk",
                             declare=[kombu_queue("genq.bulk")], serializer="json")
        theirs = conn.default_channel.basic_get("genq.bulk", no_ack=False)  # kombu records it
        [ours], _ = Inbox(broker, options).fetch({"genq.bulk": 1})
        assert broker.zcard(options["unacked_index_key"]) == 2
        records = {k.decode(): json.loads(v) for k, v in broker.hgetall(options["unacked_key"]).items()}
        kombu_record, our_record = records[theirs.delivery_tag], records[ours.tag]
    same = (len(kombu_record) == len(KOMBU_UNACKED)
            and [type(x) for x in our_record] == [type(x) for x in kombu_record]
            and our_record[1:] == kombu_record[1:]  # exchange, routing key
            and set(our_record[0]) == set(kombu_record[0]))  # the same message fields
    if not same:
        pytest.fail(f"kombu {kombu.__version__} records an unacked message unlike "
                    f"delivery.KOMBU_UNACKED {KOMBU_UNACKED} (checked with kombu "
                    f"{', '.join(KOMBU_CHECKED)}): kombu's {kombu_record!r:.300}, ours "
                    f"{our_record!r:.300}. lua/fetch.lua must write kombu's format.")
    assert json.loads(ours.raw) == our_record[0]
    if ".".join(kombu.__version__.split(".")[:2]) not in KOMBU_CHECKED:
        pytest.fail(f"kombu {kombu.__version__} is not one delivery.KOMBU_CHECKED lists "
                    f"({', '.join(KOMBU_CHECKED)}): its unacked record still matches; check "
                    "that its restore brings our messages back (the test above passes), then "
                    "add it there.")


def _drain(inbox: Inbox, want: int = 64) -> list:
    """Fetch until nothing comes (as a worker with room for ``want`` of each priority)."""
    got = []
    while batch := inbox.fetch(dict.fromkeys(REQUEST_QUEUES, want))[0]:
        got += batch
    return got


def test_a_worker_never_takes_what_it_cannot_serve_at_any_volume(client, redis_url):
    """1,600 adapter requests (two adapters, one served by no worker) among 400 plain ones,
    interactive and on an owner's bulk list: a worker without the adapters takes every plain
    one and none of the others, moving each aside once (a fetch after that scans none of
    them); a worker with ``pirate`` then takes its requests in order."""
    r = redis.Redis.from_url(redis_url)
    client.store.heartbeat("lora@test", {"adapters": ["pirate", "ghost"]})
    def batch(tag: str) -> list[dict]:
        return [{"prompt": f"{tag}{i}", "max_new_tokens": 1,
                 **({"adapter": "pirate" if i % 5 < 3 else "ghost"} if i % 5 else {})}
                for i in range(1000)]
    client.submit_many(batch("i"), priority="interactive")
    client.as_owner("team-a").submit_many(batch("b"))
    options = transport_options(client.settings)

    def prompts(deliveries) -> list[str]:
        return [d.decode()[0][0][0]["prompt"] for d in deliveries]

    plain = _drain(Inbox(r, options, adapters=[]))
    assert sorted(prompts(plain)) == sorted(f"{t}{i}" for t in "ib" for i in range(0, 1000, 5))
    assert {d.decode()[1].get("genq_adapter") for d in plain} == {None}
    assert r.llen(INTERACTIVE_QUEUE) == r.llen(f"{BULK_QUEUE}.team-a") == 0
    assert pending_by_queue(r) == {INTERACTIVE_QUEUE: 800, BULK_QUEUE: 800}
    r.config_resetstat()
    deliveries, left = Inbox(r, options, adapters=[]).fetch(dict.fromkeys(REQUEST_QUEUES, 64))
    assert deliveries == [] and left == {INTERACTIVE_QUEUE: 800, BULK_QUEUE: 800}
    assert int(r.info("commandstats").get("cmdstat_rpop", {}).get("calls", 0)) <= 8  # no rescan

    pirate = _drain(Inbox(r, options, adapters=["pirate"]))
    for t, queue in (("i", INTERACTIVE_QUEUE), ("b", BULK_QUEUE)):  # in submission order
        assert prompts(d for d in pirate if d.priority_queue == queue) == [
            f"{t}{i}" for i in range(1000) if i % 5 in (1, 2)]
    assert {d.decode()[1]["genq_adapter"] for d in pirate} == {"pirate"}
    assert pending_by_queue(r) == {INTERACTIVE_QUEUE: 400, BULK_QUEUE: 400}  # ghost's wait


def test_owner_lists_are_dropped_once_empty_and_unpinned(client, redis_url):
    """``genq:bulk:weights`` keeps an owner's list while it holds messages, while any of its
    messages is held by a worker (kombu may restore it there) or set aside, and while a publish
    is in flight; the fetch script drops it after that, and a new publish adds it back."""
    r = redis.Redis.from_url(redis_url)
    inbox = Inbox(r, transport_options(client.settings))
    owners = [client.as_owner(f"team-{i}") for i in range(30)]
    for owner in owners:
        owner.submit(prompt=owner.owner, priority="bulk")
    held = _drain(inbox)
    assert len(held) == 30 and r.hlen(OWNER_LISTS_KEY) == 30  # empty, but held
    inbox.ack(held[1:])
    r.sadd(pins_key("genq.bulk.team-0"), "publish:in-flight")
    inbox.fetch({BULK_QUEUE: 1})
    assert sorted(r.hkeys(OWNER_LISTS_KEY)) == sorted(  # held, or being published to
        {held[0].queue.encode(), b"genq.bulk.team-0"})
    inbox.ack(held[:1])
    r.srem(pins_key("genq.bulk.team-0"), "publish:in-flight")
    inbox.fetch({BULK_QUEUE: 1})
    assert r.hlen(OWNER_LISTS_KEY) == 0 and not r.keys("genq:pins:*")
    again = owners[3].submit(prompt="again", priority="bulk")
    [delivery], _ = inbox.fetch({BULK_QUEUE: 1})
    assert delivery.decode()[1]["id"] == again and r.hget(PARKED_KEY, "bulk") in (None, b"0")


def test_set_aside_requests_that_ended_are_dropped_and_stop_counting(client, redis_url):
    """Requests for an adapter whose worker stopped are set aside by a worker without it;
    those cancelled or past their deadline meanwhile are dropped by any worker's sweep (past
    the deadline: stored ``expired`` there), so queue depths and ``/demand`` count only what
    still waits; a replayed sweep drops nothing twice; a worker with the adapter that starts
    later takes exactly the ones still waiting, and nothing pins the owner's list after."""
    r = redis.Redis.from_url(redis_url)
    options = transport_options(client.settings)
    client.store.heartbeat("lora@test", {"adapters": ["ghost"]})
    team = client.as_owner("team-a")
    ids = [c.submit(prompt=f"{p}{i}", adapter="ghost", priority=p,
                    **({"expires_in_s": 1} if i < 2 else {}))
           for c, p in ((client, "interactive"), (team, "bulk")) for i in range(6)]
    assert _drain(Inbox(r, options, adapters=[])) == []  # all set aside
    assert pending_by_queue(r) == {INTERACTIVE_QUEUE: 6, BULK_QUEUE: 6}
    assert client.cancel(ids[2]) and team.cancel(ids[8])
    time.sleep(1.2)
    inbox = Inbox(r, options, adapters=[])
    assert sorted(drop_ended_parked(inbox, client.store, time.time())) == sorted(
        ids[0:3] + ids[6:9])
    assert [rec["status"] for rec in client.store.get_many(ids[:3] + ids[6:9])] == [
        "expired", "expired", "cancelled"] * 2
    assert pending_by_queue(r) == {INTERACTIVE_QUEUE: 3, BULK_QUEUE: 3}
    assert drop_ended_parked(inbox, client.store, time.time()) == []
    assert pending_by_queue(r) == {INTERACTIVE_QUEUE: 3, BULK_QUEUE: 3}
    ghost = _drain(Inbox(r, options, adapters=["ghost"]))
    assert sorted(d.decode()[1]["id"] for d in ghost) == sorted(ids[3:6] + ids[9:12])
    Inbox(r, options).ack(ghost)
    assert drop_ended_parked(inbox, client.store, time.time()) == []
    assert pending_by_queue(r) == {INTERACTIVE_QUEUE: 0, BULK_QUEUE: 0}
    assert not r.smembers(PARKED_LISTS_KEY) and not r.smembers(pins_key("genq.bulk.team-a"))
