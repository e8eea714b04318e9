"""Ending an OpenAI batch once every request is final: the output and error files, once.

The first read that sees the batch's requests all final takes a lease (kept alive while it
works, ``worker.compat.lease``; reads meanwhile answer ``finalizing``) and writes the output
file (succeeded requests) and the error file (the others), both purpose ``batch_output``, lines
in input order, in OpenAI's documented format: an HTTP answer in ``response`` (a bad body:
400, an unknown model: 404, OpenAI's error object as its body), any other failure in
``error``::

    {"id": "batch_req_<request id>", "custom_id": ..., "error": null,
     "response": {"status_code": 200, "request_id": <request id>, "body": <chat.completion>}}
    {"id": "batch_req_<request id>", "custom_id": ..., "error": null,
     "response": {"status_code": 400, "request_id": <request id>,
                  "body": {"error": {"message", "type", "param", "code"}}}}
    {"id": "batch_req_<request id>", "custom_id": ..., "response": null,
     "error": {"code": "batch_expired" | "batch_cancelled" | "out_of_memory" | ..., "message": ...}}

``request_counts``: ``completed`` the succeeded requests, ``failed`` every other final one.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from typing import Any

from worker.compat.batch_input import fault
from worker.compat.batch_records import batch_key
from worker.compat.lease import Lease
from worker.compat.shapes import chat_completion, error_object, text_completion
from worker.lifecycle import BATCH_FINAL, batch_status

LOCK_S = 30  # the finalization lease (kept alive while the files are written and uploaded)
SPOOL_BYTES = 8 * 1024 * 1024
HTTP_ERRORS = {"invalid_request": 400, "prompt_too_long": 400, "model_not_found": 404}
MESSAGES = {"batch_expired": "This request could not be executed before the completion window "
                             "expired.",
            "batch_cancelled": "This request was cancelled before it finished.",
            "batch_failed": "This request was not run: the batch failed."}


class Finalizer:
    """Ends batches for ``batches`` (a ``worker.compat.batches.Batches``): their files, their
    final status."""

    def __init__(self, batches):
        self.batches = batches
        self.client, self.settings, self.files = batches.client, batches.settings, batches.files

    def finalize(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write the output and error files once and end the batch: completed, expired or
        cancelled. One finalizer at a time: it holds a lease (others answer ``finalizing``),
        renewed by its token alone and kept alive through the uploads; one that lost it
        leaves the batch to the finalizer that took it."""
        batch_id = record["id"]
        lease = Lease(self.batches.redis, f"{batch_key(batch_id)}:lock", LOCK_S)
        if not lease.acquire():
            current = self.batches.load_any(batch_id)
            return current if current["status"] in BATCH_FINAL else {**current, "status": "finalizing"}
        try:
            record = self.batches.update(batch_id, lambda cur: None if cur["status"] in BATCH_FINAL
                                         else {**cur, "status": "finalizing",
                                               "finalizing_at": cur.get("finalizing_at")
                                               or int(time.time())})
            if record["status"] in BATCH_FINAL:
                return record
            written = self._write_files(record)
            job = self.client.store.job(record["job_id"])
            if not lease.held():
                return {**self.batches.load_any(batch_id), "status": "finalizing"}
            return self.batches.update(batch_id, _ended(job, written))
        finally:
            lease.release()

    def _write_files(self, record: dict[str, Any]) -> dict:
        """One pass over the job's results, in input order, into the two files."""
        shape = chat_completion if record["endpoint"] == "/v1/chat/completions" else text_completion
        expiring = record.get("ending") == "expired"
        outputs = [tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) for _ in range(2)]
        counts = {"total": 0, "completed": 0, "failed": 0}
        usage = {"input_tokens": 0, "output_tokens": 0}
        model = None
        now = int(time.time())
        try:
            for res in self.client.job_results(record["job_id"]):
                line = self._line(res, shape, expiring, now)
                counts["total"] += 1
                if res["status"] == "succeeded":
                    model = model or res.get("model")
                    counts["completed"] += 1
                    usage["input_tokens"] += line["response"]["body"]["usage"]["prompt_tokens"]
                    usage["output_tokens"] += line["response"]["body"]["usage"]["completion_tokens"]
                else:
                    counts["failed"] += 1
                out = outputs[0 if res["status"] == "succeeded" else 1]
                out.write((json.dumps(line, ensure_ascii=False) + "\n").encode())
            ids = [self._upload(out, record, kind)
                   for out, kind in zip(outputs, ("output", "error"), strict=True)]
        finally:
            for out in outputs:
                out.close()
        return {"output_file_id": ids[0], "error_file_id": ids[1], "request_counts": counts,
                "model": model, "usage": _usage(usage["input_tokens"], usage["output_tokens"])}

    def _line(self, res: dict[str, Any], shape: Callable, expiring: bool,
              now: int) -> dict[str, Any]:
        """A result's line: an HTTP answer in ``response``, or an ``error``."""
        rid = res["id"]
        line: dict[str, Any] = {"id": f"batch_req_{rid}", "custom_id": res.get("custom_id")}
        if res["status"] == "failed" and (res.get("error") or {}).get("code") in HTTP_ERRORS:
            return {**line, "response": _refused(res), "error": None}
        if res["status"] == "succeeded":
            body = shape(res, res.get("model") or self.settings.model, created=now)
            return {**line, "response": {"status_code": 200, "request_id": rid, "body": body},
                    "error": None}
        if res["status"] == "failed":
            err = res.get("error") or {}
            code = err.get("code") or "internal"
            message = err.get("message") or "the request failed"
        else:
            code = ("batch_expired" if res["status"] == "expired" or expiring
                    else "batch_cancelled" if res["status"] == "cancelled"
                    else "batch_failed")
            message = MESSAGES[code]
        return {**line, "response": None, "error": {"code": code, "message": message}}

    def _upload(self, out, record: dict[str, Any], kind: str) -> str | None:
        """Store one written file (``kind``: output or error) as the batch owner's; its id, or
        None when it holds no line."""
        if not out.tell():
            return None
        out.seek(0)
        return self.files.create(iter(lambda: out.read(1024 * 1024), b""),
                                 filename=f"{record['id']}_{kind}.jsonl",
                                 purpose="batch_output", owner=record.get("owner"))["id"]


def _ended(job: dict[str, Any], written: dict[str, Any]) -> Callable[[dict], dict | None]:
    """The change that ends a batch whose ``job`` ended and whose files are ``written``."""

    def end(cur: dict) -> dict | None:
        if cur["status"] in BATCH_FINAL:
            return None
        now = int(time.time())
        status = batch_status(cur.get("ending"), job["status"], job["counts"]["expired"])
        errors = cur.get("errors")
        if job["status"] == "failed" and not errors:
            errors = {"object": "list", "data": [fault(
                "batch_failed", job.get("error") or "the batch failed", None)]}
        return {**cur, "status": status, f"{status}_at": now, "errors": errors,
                "output_file_id": written["output_file_id"],
                "error_file_id": written["error_file_id"],
                "request_counts": written["request_counts"], "usage": written["usage"],
                "model": written["model"]}

    return end


def _refused(res: dict[str, Any]) -> dict[str, Any]:
    """The HTTP answer to a request the endpoint would have refused (a bad body: 400, an
    unknown model: 404), OpenAI's error object as its body."""
    err = res["error"]
    status = HTTP_ERRORS[err["code"]]
    return {"status_code": status, "request_id": res["id"],
            "body": error_object(status, err.get("message") or "invalid request", err["code"],
                                 err.get("param"))}


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """OpenAI's batch ``usage``."""
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}
