"""The gateway app: settings, the client, API keys and the routers of each surface."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from prometheus_client import Counter

from worker.api import health, native
from worker.api.errors import add_error_handlers, error_response
from worker.api.limits import JsonByDefault, LimitBody
from worker.client import GenerationClient
from worker.compat import batches as compat_batches
from worker.compat import chat as compat_chat
from worker.compat import files as compat_files
from worker.compat.storage import FileStore
from worker.ops.keys import KeyRing
from worker.ops.settings import Settings, get_settings

OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/demand", "/", "/ui"}
OPEN_PREFIXES = ("/docs", "/openapi", "/ui/")  # the status page's files hold no data


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway app for these settings (tests build one per Redis)."""
    settings = settings or get_settings()
    client = GenerationClient(settings=settings)
    keyring = KeyRing(settings)
    prometheus = health.GatewayMetrics()

    app = FastAPI(title="genqueue", version="0.1.0",
                  description="Batched LLM generation on a Celery/Redis queue.")
    app.state.client = client
    app.state.prometheus = prometheus
    app.middleware("http")(authenticate(client, keyring, prometheus.http_requests))
    app.add_middleware(LimitBody, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(JsonByDefault)
    add_error_handlers(app)

    app.include_router(native.router)
    app.include_router(health.router)
    app.mount("/ui/static", StaticFiles(directory=health.STATIC_DIR), name="static")
    files = FileStore(settings.files_root, settings.max_upload_bytes, **settings.files_options)
    app.state.files = files
    for module in (compat_files, compat_batches, compat_chat):
        app.include_router(module.router(client, settings, files))
    return app


def authenticate(client: GenerationClient, keyring: KeyRing, http_requests: Counter):
    """The HTTP middleware that sets ``request.state.client`` to the caller's client (the key's
    owner; with no keys set, ``client`` itself), answers 401 to a missing or invalid key on
    any route but the open ones, and counts each answer by route and status."""

    async def auth(request: Request, call_next):
        path = request.url.path
        request.state.client = client
        if keyring.enabled:
            principal = keyring.authenticate(request.headers.get("authorization", ""))
            if principal is not None:
                request.state.client = client.as_owner(
                    principal.id, admin=principal.admin, weight=principal.weight,
                    raw_tokens=principal.raw_tokens)
            elif path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
                return error_response(request, 401, "missing or invalid API key", "invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            request.state.authenticated = principal is not None
        else:
            request.state.authenticated = True
        response = await call_next(request)
        route = request.scope.get("route")
        http_requests.labels(route=getattr(route, "path", "unmatched"),
                             status=response.status_code).inc()
        return response

    return auth


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the gateway under uvicorn."""
    import uvicorn

    uvicorn.run(create_app(), host=host, port=port, log_config=None)
