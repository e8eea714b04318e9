"""The gateway's open routes (no API key): liveness (``/healthz``), readiness (``/readyz``),
the demand autoscaling follows (``/demand``), Prometheus metrics (``/metrics``) and the status
page (``/``, ``/ui``, its files under ``/ui/static``). They read the queue as the gateway's own
client (``app.state.client``, no owner) and report through ``app.state.prometheus``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from worker.client import GenerationClient
from worker.queue.app import BULK_QUEUE, INTERACTIVE_QUEUE, pending_by_queue

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter("genq_http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=self.registry)
        self.depth = Gauge("genq_queue_depth",
                           "Requests on each Redis list, not yet taken by a worker",
                           ["queue"], registry=self.registry)
        self.demand = Gauge("genq_demand", "Requests not finished: queued + held by workers + "
                            "running (what autoscaling should follow)", ["priority"],
                            registry=self.registry)
        self.workers_up = Gauge("genq_workers_alive", "Workers with a fresh heartbeat",
                                registry=self.registry)


def current_demand(client: GenerationClient) -> tuple[dict[str, int], dict[str, int], int]:
    """(list lengths, demand per priority: queued + held + running, live workers)."""
    lengths = pending_by_queue(client.broker)
    workers = client.store.workers()
    per_priority = {}
    for priority, q in (("interactive", INTERACTIVE_QUEUE), ("bulk", BULK_QUEUE)):
        held = sum(int((w.get(state) or {}).get(priority, 0)) for w in workers
                   for state in ("waiting", "running"))
        per_priority[priority] = lengths[q] + held
    return lengths, per_priority, len(workers)


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui", include_in_schema=False)
def status_page() -> FileResponse:
    """The status page: plain HTML and JavaScript, no build step, nothing from a CDN."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/healthz")
def healthz() -> dict:
    """The gateway process answers."""
    return {"ok": True}


@router.get("/readyz")
def readyz(request: Request, response: Response) -> dict:
    """Ready when the broker answers and at least one worker heartbeat is fresh. Without
    a valid API key (when keys are set) it says only whether it is ready."""
    client = request.app.state.client
    try:
        broker = bool(client.broker.ping())
        workers = client.store.workers()
    except Exception as exc:  # redis down: not ready, say why
        response.status_code = 503
        out = {"ready": False, "broker": False, "workers": [], "error": str(exc)[:200]}
    else:
        ready = broker and bool(workers)
        response.status_code = 200 if ready else 503
        out = {"ready": ready, "broker": broker, "workers": workers}
    return out if request.state.authenticated else {"ready": out["ready"]}


@router.get("/demand")
def get_demand(request: Request, response: Response) -> dict:
    """Requests not finished, per priority and in total (what KEDA scales workers on)."""
    try:
        _, per_priority, alive = current_demand(request.app.state.client)
    except Exception as exc:  # redis down: say so, do not scale on a guess
        response.status_code = 503
        return {"error": str(exc)[:200]}
    return {**per_priority, "total": sum(per_priority.values()), "workers": alive}


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus metrics of the gateway: queue depth, demand per priority, live workers."""
    prometheus: GatewayMetrics = request.app.state.prometheus
    try:
        lengths, per_priority, alive = current_demand(request.app.state.client)
        for q, n in lengths.items():
            prometheus.depth.labels(queue=q).set(n)
        for priority, n in per_priority.items():
            prometheus.demand.labels(priority=priority).set(n)
        prometheus.workers_up.set(alive)
    except Exception:  # scrape still answers while Redis is down
        prometheus.workers_up.set(0)
    return Response(generate_latest(prometheus.registry), media_type=CONTENT_TYPE_LATEST)
