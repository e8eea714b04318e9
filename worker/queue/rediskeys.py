"""The result store's Redis keys, and the compact JSON written under them.

Keys (all expire after ``GENQ_RESULT_TTL_S``):
``genq:r:<id>`` result JSON · ``genq:cancel:<id>`` cancel flag · ``genq:job:<jid>`` counts
(hash) · ``genq:job:<jid>:ids`` submission order (list) · ``genq:job:<jid>:done`` and
``:running`` (sets) · ``genq:rjobs:<id>`` other jobs a request belongs to (idempotency keys) ·
``genq:idem:<scope>:<key>`` idempotency claims · ``genq:attempts:<id>`` how many times a
worker started it · ``genq:starts:<id>`` each start's token and whether it ran alone ·
``genq:owner:<id>`` who submitted it · ``genq:pending:<owner>`` how many of an owner's
requests are not final (the per-key quota) · ``genq:jobs:open`` jobs still being submitted, by
last sign of life (the reaper's index) · ``genq:hook:<id>`` a request's webhook URL ·
``genq:events`` webhook events for ``genq notifier`` (see ``worker.queue.webhooks``) ·
``genq:worker:<name>`` and the hash ``genq:workers`` heartbeats.
"""

from __future__ import annotations

import json
from typing import Any

WORKERS_KEY = "genq:workers"  # hash: worker name -> its latest heartbeat (JSON)
OPEN_JOBS_KEY = "genq:jobs:open"  # zset: job id -> when its submitter last showed life


def result_key(request_id: str) -> str:
    return f"genq:r:{request_id}"


def job_key(job_id: str) -> str:
    return f"genq:job:{job_id}"


def attempts_key(request_id: str) -> str:
    return f"genq:attempts:{request_id}"


def starts_key(request_id: str) -> str:
    return f"genq:starts:{request_id}"


def owner_key(request_id: str) -> str:
    return f"genq:owner:{request_id}"


def pending_key(owner: str) -> str:
    return f"genq:pending:{owner}"


def dumps(value: Any) -> str:
    """``value`` as compact JSON (UTF-8 kept), as every record is stored."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
