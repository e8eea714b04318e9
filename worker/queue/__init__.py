"""The queue layer: Celery app, the batching consumer, the result store and jobs."""
