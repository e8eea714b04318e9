"""The Celery app: JSON only, late acks, a Redis visibility timeout kept alive by lease renewal.

Requests travel as ordinary Celery task messages (task ``genq.generate``, one request dict as
the only argument) on two Redis lists, ``genq.interactive`` and ``genq.bulk``, so any Celery
producer can enqueue and ``AsyncResult(id)`` reads the outcome. A foreign producer sends to the
intake queue ``genq`` instead, where it gets our client's accounting (``worker.queue.intake``).
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from worker.ops.redisconn import CONNECT_TIMEOUT_S, HEALTH_CHECK_S, SOCKET_TIMEOUT_S, celery_options
from worker.ops.settings import Settings, get_settings

TASK_NAME = "genq.generate"
INTERACTIVE_QUEUE = "genq.interactive"
BULK_QUEUE = "genq.bulk"
REQUEST_QUEUES = (INTERACTIVE_QUEUE, BULK_QUEUE)  # served in this order
CONTROL_QUEUE = "genq.control"  # the Celery consumer's own queue; nothing is sent there
# hash: each owner's bulk list -> its weight in bulk admission. A publisher adds its list
# before publishing; the fetch script removes a list that is empty and unpinned (``pins_key``)
OWNER_LISTS_KEY = "genq:bulk:weights"
# hash: priority -> messages the fetch script set aside for an adapter (on ``<list>\x06\x17<adapter>``)
PARKED_KEY = "genq:parked"
# set: the set-aside lists (named in ``lua/fetch.lua``), so that a sweep finds requests there
# that ended (cancelled, past their deadline) while no worker serving their adapter ran
PARKED_LISTS_KEY = "genq:parked:lists"
BULK_BELL = "genq:bell:bulk"  # rung after publishing to an owner's bulk list
# kombu's Redis transport puts a message sent with Celery's priority=N on ``<queue>\x06\x16<step>``
PRIORITY_STEPS = ("\x06\x163", "\x06\x166", "\x06\x169")
# kombu's unacked hash, its index and its restore lock, under names of genqueue's own: kombu's
# visibility-timeout restore in a genqueue process (60 s) then scans only genqueue's messages,
# never those of a host Celery app sharing the Redis database (its default names are
# ``unacked``, ``unacked_index``, ``unacked_mutex``), and the host's restore never ours
UNACKED_KEY = "genq:unacked"
UNACKED_INDEX_KEY = "genq:unacked_index"
UNACKED_MUTEX_KEY = "genq:unacked_mutex"


def queue_for(priority: str | None, owner: str | None = None) -> str:
    """The Redis list a request goes to: interactive unless it says bulk; an owner's bulk
    requests have a list of their own, so workers can take from owners in turn."""
    if priority != "bulk":
        return INTERACTIVE_QUEUE
    return f"{BULK_QUEUE}.{owner}" if owner else BULK_QUEUE


def pins_key(name: str) -> str | None:
    """For an owner's bulk list, the set of what keeps it in ``OWNER_LISTS_KEY`` though it
    is empty: tags of its messages held or set aside (kombu may restore them onto it) and
    publishes in flight; None for the shared lists, which are always read."""
    return f"genq:pins:{name}" if name.startswith(BULK_QUEUE + ".") else None


def logical_queue(name: str) -> str:
    """``genq.interactive`` or ``genq.bulk`` for any list a request can be on."""
    return BULK_QUEUE if name.startswith(BULK_QUEUE) else INTERACTIVE_QUEUE


def request_lists(client) -> tuple[list[str], list[str], list[int]]:
    """(interactive lists, bulk lists, each bulk list's weight) that requests can be on: the
    two queues, the lists of Celery's priority steps (a foreign producer's ``priority=``), and
    the owners' lists in ``OWNER_LISTS_KEY`` (one read)."""
    owners = sorted((k.decode() if isinstance(k, bytes) else k, int(w))
                    for k, w in client.hgetall(OWNER_LISTS_KEY).items())
    interactive = [INTERACTIVE_QUEUE, *(INTERACTIVE_QUEUE + s for s in PRIORITY_STEPS)]
    shared = [BULK_QUEUE, *(BULK_QUEUE + s for s in PRIORITY_STEPS)]
    return (interactive, [*shared, *(name for name, _ in owners)],
            [1] * len(shared) + [weight for _, weight in owners])


def pending_by_queue(client) -> dict[str, int]:
    """How many requests wait on Redis, per logical queue, those set aside for an adapter
    included (one round trip after the lookup)."""
    interactive, bulk, _ = request_lists(client)
    pipe = client.pipeline(transaction=False)
    for name in (*interactive, *bulk):
        pipe.llen(name)
    pipe.hmget(PARKED_KEY, "interactive", "bulk")
    *lengths, parked = pipe.execute()
    parked = [int(n or 0) for n in parked]
    return {INTERACTIVE_QUEUE: sum(lengths[:len(interactive)]) + parked[0],
            BULK_QUEUE: sum(lengths[len(interactive):]) + parked[1]}


def kombu_queue(name: str) -> Queue:
    """A queue as Celery declares it: a direct exchange of the same name, bound by name."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def transport_options(settings: Settings, batch_publish: bool = False) -> dict:
    """kombu Redis transport options shared by producers, the Celery consumer and ours.

    ``batch_publish`` (clients): no replay of a command that timed out, which is what lets
    kombu pipeline ``Producer.batch`` (it publishes one round trip per message otherwise); a
    submit that times out fails visibly instead of maybe queueing a message twice."""
    sentinel = celery_options(settings).get("sentinel", {})
    return {
        **sentinel,
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_key": UNACKED_KEY,
        "unacked_index_key": UNACKED_INDEX_KEY,
        "unacked_mutex_key": UNACKED_MUTEX_KEY,
        "unacked_restore_interval": 2,
        "unacked_restore_throttle": 1,
        # kombu holds this lock while it restores expired messages; its default (300 s) means a
        # worker killed while holding it blocks every redelivery for five minutes
        "unacked_mutex_expire": 10,
        "queue_order_strategy": "priority",
        "socket_keepalive": True,
        "socket_timeout": SOCKET_TIMEOUT_S,  # kombu's BRPOP waits 1 s at most
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_S,
        "retry_on_timeout": not batch_publish,
    }


def make_app(settings: Settings | None = None, batch_publish: bool = False) -> Celery:
    """A Celery app configured from ``GENQ_`` settings (``batch_publish``: a client's)."""
    settings = settings or get_settings()
    extra = celery_options(settings)
    extra.pop("sentinel", None)
    app = Celery("genqueue", broker=settings.broker_url.get_secret_value(),
                 backend=settings.result_backend_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        result_expires=settings.result_ttl_s,
        redis_socket_timeout=SOCKET_TIMEOUT_S,  # the result backend's: as every connection's
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        redis_socket_keepalive=True,
        redis_backend_health_check_interval=HEALTH_CHECK_S,
        broker_transport_options=transport_options(settings, batch_publish),
        result_backend_transport_options={"retry_policy": {"timeout": 5.0},
                                          **extra.pop("result_backend_transport_options", {})},
        broker_connection_retry_on_startup=True,
        task_default_queue=CONTROL_QUEUE,
        task_queues=[kombu_queue(q) for q in (*REQUEST_QUEUES, CONTROL_QUEUE)],
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=False,
        **extra,  # TLS
    )
    return app


def __getattr__(name: str) -> Celery:
    """``celery -A worker.queue.app inspect ping`` (and ``status``, ``events``, Flower): the
    module's ``app`` / ``celery`` is an app configured from the ``GENQ_`` settings, made on
    first use (importing this module connects to nothing)."""
    if name in ("app", "celery"):
        global _APP
        if _APP is None:
            _APP = make_app()
        return _APP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_APP: Celery | None = None
