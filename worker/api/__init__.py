"""The HTTP gateway (FastAPI; ``genq api``): a thin shell over ``GenerationClient``.

Routes are the contract's. Bad input gets 422 with field-level messages, a full queue (or a
key over ``GENQ_MAX_PENDING_PER_KEY``) 429 with ``Retry-After``, unknown ids 404, an unreachable
Redis 503. Bodies are limited by the bytes actually read (chunked uploads included). With
``GENQ_API_KEYS`` set, every route but the health and metrics routes needs ``Authorization:
Bearer <key>``; each key owns what it submits, and another key's requests and jobs answer 404
(``GENQ_ADMIN_KEYS`` see everything).

``app.py`` builds the app (settings, the client, API keys, the routers); ``limits.py`` the body
limits; ``errors.py`` the errors in the shape of the route; ``native.py`` genqueue's own routes;
``health.py`` the open routes (health, demand, metrics, the status page); the OpenAI surface is
``worker.compat``.
"""

from worker.api.app import OPEN_PATHS, create_app, serve
from worker.api.errors import is_openai_route

__all__ = ["OPEN_PATHS", "create_app", "is_openai_route", "serve"]
