"""Prometheus metrics (``genq_`` namespace) for workers; the gateway reuses the names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
FRACTION_BUCKETS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics:
    """One worker's counters and histograms, in their own registry."""

    def __init__(self, worker: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = {"worker": worker}
        kw = {"registry": self.registry, "namespace": "genq"}
        self.requests = Counter("requests", "Requests finished, by final status",
                                ["worker", "status"], **kw)
        self.duplicates = Counter("redelivered_duplicates", "Redelivered requests already final",
                                  ["worker"], **kw).labels(**labels)
        self.batch_size = Histogram("batch_size", "Rows per generate batch", ["worker"],
                                    buckets=SIZE_BUCKETS, **kw).labels(**labels)
        self.pad_fraction = Histogram("batch_pad_fraction", "Pad tokens / prompt tokens per batch",
                                      ["worker"], buckets=FRACTION_BUCKETS, **kw).labels(**labels)
        self.queue_wait = Histogram("queue_wait_seconds", "Submit to batch start", ["worker"],
                                    buckets=SECONDS_BUCKETS, **kw).labels(**labels)
        self.generate = Histogram("generate_seconds", "Engine time per batch", ["worker"],
                                  buckets=SECONDS_BUCKETS, **kw).labels(**labels)
        self.tokens = Counter("generated_tokens", "Completion tokens generated", ["worker"],
                              **kw).labels(**labels)
        self.up = Gauge("worker_up", "1 while the worker runs", ["worker"], **kw).labels(**labels)
        self.busy = Gauge("worker_busy", "1 while a batch runs", ["worker"], **kw).labels(**labels)
        self.oom_splits = Counter("oom_splits", "Batches split in halves after out-of-memory",
                                  ["worker"], **kw).labels(**labels)
        self.worker = worker
        self.up.set(1)

    @classmethod
    def start(cls, port: int | None, worker: str) -> WorkerMetrics:
        """Metrics for ``worker``, served on ``port`` when one is given."""
        metrics = cls(worker)
        if port:
            start_http_server(port, registry=metrics.registry)
        return metrics

    def observe_batch(self, runnable, results, closed, duplicates) -> None:
        """Record one batch: its rows' outcomes, size, padding, waits and tokens."""
        for res in [*results, *closed]:
            self.requests.labels(worker=self.worker, status=res["status"]).inc()
        if duplicates:
            self.duplicates.inc(len(duplicates))
        done = [r for r in results if r.get("batch")]
        if done:
            self.batch_size.observe(len(runnable))
            self.pad_fraction.observe(done[0]["batch"]["pad_fraction"])
            self.generate.observe((done[0]["timings"]["generate_ms"] or 0) / 1000)
        for res in done:
            self.queue_wait.observe(res["timings"]["queued_ms"] / 1000)
            self.tokens.inc(res["usage"]["completion_tokens"])
