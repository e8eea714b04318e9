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
        self.batch_size = Histogram("batch_size", "Rows per decode step", ["worker"],
                                    buckets=SIZE_BUCKETS, **kw).labels(**labels)
        self.pad_fraction = Histogram("batch_pad_fraction", "Pad tokens / prompt tokens per prefill",
                                      ["worker"], buckets=FRACTION_BUCKETS, **kw).labels(**labels)
        self.queue_wait = Histogram("queue_wait_seconds", "Submit to first forward pass", ["worker"],
                                    buckets=SECONDS_BUCKETS, **kw).labels(**labels)
        self.generate = Histogram("generate_seconds", "First forward pass to result, per request",
                                  ["worker"], buckets=SECONDS_BUCKETS, **kw).labels(**labels)
        self.tokens = Counter("generated_tokens", "Completion tokens generated", ["worker"],
                              **kw).labels(**labels)
        self.steps = Counter("decode_steps", "Decode steps run", ["worker"], **kw).labels(**labels)
        self.row_steps = Counter("row_steps", "Rows computed, summed over decode steps", ["worker"],
                                 **kw).labels(**labels)
        self.useful_row_steps = Counter("useful_row_steps", "Rows that produced a token, summed "
                                        "over decode steps", ["worker"], **kw).labels(**labels)
        self.evictions = Counter("evictions", "Rows sent back to wait (out of memory, or room for "
                                 "interactive rows)", ["worker"], **kw).labels(**labels)
        self.oom = Counter("out_of_memory", "Forward passes that ran out of memory", ["worker"],
                           **kw).labels(**labels)
        self.grammar_compiles = Counter("grammar_compiles", "response_format grammars compiled "
                                        "(not in the cache)", ["worker"], **kw).labels(**labels)
        self.grammar_cache_hits = Counter("grammar_cache_hits", "Constrained rows whose grammar "
                                          "was in the cache", ["worker"], **kw).labels(**labels)
        self.running = Gauge("running_rows", "Rows in running batches", ["worker"],
                             **kw).labels(**labels)
        self.waiting = Gauge("waiting_rows", "Requests held, waiting to join", ["worker"],
                             **kw).labels(**labels)
        self.up = Gauge("worker_up", "1 while the worker runs", ["worker"], **kw).labels(**labels)
        self.busy = Gauge("worker_busy", "1 while rows run", ["worker"], **kw).labels(**labels)
        self.worker = worker
        self._seen = {"steps": 0, "row_steps": 0, "useful": 0, "evictions": 0, "ooms": 0,
                      "compiles": 0, "hits": 0}
        self.up.set(1)

    @classmethod
    def start(cls, port: int | None, worker: str) -> WorkerMetrics:
        """Metrics for ``worker``, served on ``port`` when one is given."""
        metrics = cls(worker)
        if port:
            start_http_server(port, registry=metrics.registry)
        return metrics

    def observe_step(self, loop) -> None:
        """After a scheduler turn: the rows its decode step computed, and the loop's totals."""
        if loop.steps > self._seen["steps"]:
            self.batch_size.observe(loop.last_step_rows)
        grammars = loop.engine.compiled_grammars
        now = {"steps": loop.steps, "row_steps": loop.row_steps, "useful": loop.useful_row_steps,
               "evictions": loop.evictions, "ooms": loop.ooms,
               "compiles": grammars.misses if grammars else 0, "hits": grammars.hits if grammars else 0}
        for name, counter in (("steps", self.steps), ("row_steps", self.row_steps),
                              ("useful", self.useful_row_steps), ("evictions", self.evictions),
                              ("ooms", self.oom), ("compiles", self.grammar_compiles),
                              ("hits", self.grammar_cache_hits)):
            if now[name] > self._seen[name]:
                counter.inc(now[name] - self._seen[name])
        self._seen = now
        running = len(loop.running)
        self.running.set(running)
        self.waiting.set(len(loop.waiting))
        self.busy.set(1 if running else 0)

    def observe_results(self, results) -> None:
        """Record finished requests: status, waits, generation time, tokens, prefill padding."""
        for res in results:
            self.requests.labels(worker=self.worker, status=res["status"]).inc()
            timings, usage = res.get("timings") or {}, res.get("usage")
            if usage is None:
                continue
            self.tokens.inc(usage["completion_tokens"])
            if timings.get("queued_ms") is not None:
                self.queue_wait.observe(timings["queued_ms"] / 1000)
                self.generate.observe((timings["generate_ms"] or 0) / 1000)
            if res.get("batch"):
                self.pad_fraction.observe(res["batch"]["pad_fraction"])
