"""Results as Celery's Redis result backend stores them: the record's ``celery-task-meta-<id>``
mirror (written by the Lua scripts with the record, and published on its channel), so
``AsyncResult(id).get()`` returns as soon as a result is stored and ``.state`` reads PENDING
(no meta), STARTED, then SUCCESS, FAILURE or REVOKED."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

CELERY_STATE = {"succeeded": "SUCCESS", "failed": "FAILURE", "cancelled": "REVOKED",
                "expired": "REVOKED"}


def meta_key(request_id: str) -> str:
    """Celery's result key (``RedisBackend.get_key_for_task``), also its pub/sub channel."""
    return f"celery-task-meta-{request_id}"


def celery_meta(record: dict[str, Any], worker: str | None = None) -> dict[str, Any]:
    """Celery's result meta for a record: STARTED while running (``result``: the worker, as
    Celery stores it), SUCCESS with the result dict, FAILURE with ``GenerationFailed("<code>:
    <message>")``, REVOKED (``TaskRevokedError``) when cancelled or expired."""
    status = record["status"]
    if status == "running":
        return {"status": "STARTED", "result": {"hostname": worker or record.get("worker"),
                                                "pid": None},
                "traceback": None, "children": [], "date_done": None, "task_id": record["id"]}
    if status == "failed":
        err = record.get("error") or {}
        payload: Any = {"exc_type": "GenerationFailed", "exc_module": "worker.errors",
                        "exc_message": [f"{err.get('code')}: {err.get('message')}"]}
    elif status in ("cancelled", "expired"):
        payload = {"exc_type": "TaskRevokedError", "exc_module": "celery.exceptions",
                   "exc_message": [status]}
    else:
        payload = record
    return {"status": CELERY_STATE[status], "result": payload, "traceback": None,
            "children": [], "date_done": datetime.now(UTC).isoformat(), "task_id": record["id"]}
