"""Every Redis connection genqueue opens, from one of its URLs.

- ``redis://[:password@]host:port/db``: one server.
- ``rediss://...``: TLS; the CA from ``GENQ_REDIS_CA_FILE`` (client certificates optional:
  ``GENQ_REDIS_CERT_FILE`` and ``GENQ_REDIS_KEY_FILE``).
- ``sentinel://[:password@]host:port;sentinel://host:port/db``: kombu's Sentinel form. The
  client asks the sentinels for the current primary of ``GENQ_REDIS_SENTINEL_MASTER`` and asks
  again after a failover (redis-py's ``SentinelConnectionPool``), so every command and Lua
  script runs on the primary. The password is used for the sentinels and the data nodes.

Celery and kombu get the same settings from ``celery_options`` (``worker.queue.app``).
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from worker.ops.settings import Settings, get_settings

SOCKET_TIMEOUT_S = 10.0  # longest a command may wait for its reply (blocking ones set more)
CONNECT_TIMEOUT_S = 5.0
HEALTH_CHECK_S = 10  # a connection idle this long is PINGed before use


def sentinel_kwargs(settings: Settings, password: str | None) -> dict[str, Any]:
    """redis-py's keyword arguments for the connections to the sentinels themselves: the
    password, TLS where ``GENQ_REDIS_SENTINEL_TLS`` asks for it, and the timeouts, keepalive
    and health checks every other connection has (a frozen sentinel raises within seconds)."""
    tls = tls_options(settings) if settings.redis_sentinel_tls else {}
    if tls:
        tls["ssl"] = True
    return {"password": password, **tls, "socket_timeout": CONNECT_TIMEOUT_S,
            "socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_keepalive": True,
            "health_check_interval": HEALTH_CHECK_S}


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS keyword arguments (empty without ``GENQ_REDIS_CA_FILE``)."""
    if not settings.redis_ca_file:
        return {}
    options: dict[str, Any] = {"ssl_ca_certs": str(settings.redis_ca_file),
                               "ssl_cert_reqs": "required"}
    if settings.redis_cert_file:
        options["ssl_certfile"] = str(settings.redis_cert_file)
        options["ssl_keyfile"] = str(settings.redis_key_file or settings.redis_cert_file)
    return options


def sentinel_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """(sentinel addresses, password, db) of a ``sentinel://h:p;sentinel://h:p/db`` URL."""
    nodes, password, db = [], None, 0
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(f"not a sentinel:// address: {part[:60]!r}")
        nodes.append((parts.hostname, parts.port or 26379))
        password = unquote(parts.password) if parts.password else password
        if parts.path.strip("/").isdigit():
            db = int(parts.path.strip("/"))
    return nodes, password, db


def connect(url: str, settings: Settings | None = None, **kwargs: Any) -> redis.Redis:
    """A redis-py client for ``url`` (redis://, rediss:// or sentinel://), with ``kwargs``
    (``decode_responses``, timeouts...) passed through. Every connection has timeouts, TCP
    keepalive and health checks unless ``kwargs`` say otherwise, so a half-open connection
    (a Redis host frozen or gone without a FIN) raises within seconds instead of hanging."""
    settings = settings or get_settings()
    kwargs = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S,
              "socket_keepalive": True, "health_check_interval": HEALTH_CHECK_S, **kwargs}
    if url.startswith("sentinel://"):
        nodes, password, db = sentinel_nodes(url)
        tls = tls_options(settings) if settings.redis_sentinel_tls else {}
        if tls:
            tls["ssl"] = True
        sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_kwargs(settings, password),
                            password=password, db=db, **tls)
        return sentinel.master_for(settings.redis_sentinel_master, **kwargs)
    if url.startswith("rediss://"):
        kwargs = {**tls_options(settings), **kwargs}
    return redis.Redis.from_url(url, **kwargs)


def celery_options(settings: Settings) -> dict[str, Any]:
    """Celery settings for Sentinel and TLS on the broker and the result backend."""
    out: dict[str, Any] = {}
    tls = tls_options(settings)
    ssl_conf = {**tls, "ssl_cert_reqs": ssl.CERT_REQUIRED} if tls else None
    broker = settings.broker_url.get_secret_value()
    if broker.startswith("rediss://") and ssl_conf:
        out["broker_use_ssl"] = ssl_conf
    if settings.result_backend_url.startswith("rediss://") and ssl_conf:
        out["redis_backend_use_ssl"] = ssl_conf
    if broker.startswith("sentinel://") or settings.result_backend_url.startswith("sentinel://"):
        _, password, _ = sentinel_nodes(broker if broker.startswith("sentinel://")
                                        else settings.result_backend_url)
        if settings.redis_sentinel_tls and tls:
            out["broker_use_ssl"] = ssl_conf  # the data nodes speak TLS too
        sentinel = {"master_name": settings.redis_sentinel_master,
                    "sentinel_kwargs": sentinel_kwargs(settings, password)}
        if settings.result_backend_url.startswith("sentinel://"):
            out["result_backend_transport_options"] = sentinel
            if settings.redis_sentinel_tls and tls:
                out["redis_backend_use_ssl"] = ssl_conf
        out["sentinel"] = sentinel
    return out
