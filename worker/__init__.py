"""genqueue: batched LLM generation behind a Celery/Redis queue.

Layers: ``worker.engine`` (model, padding, batches; no queue), ``worker.queue`` (Celery,
batching consumer, results, jobs), interfaces (``worker.client``, ``worker.api``,
``worker.cli``) and ``worker.ops`` (settings, logging, metrics).
"""

__version__ = "0.1.0"
