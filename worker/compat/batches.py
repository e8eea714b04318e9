"""OpenAI's Batch API (``/v1/batches``) over genqueue's bulk jobs, driven unchanged by the SDKs.

``POST /v1/batches`` reads the caller's input file (uploaded with purpose ``batch``), checks
every line (an OpenAI Batch line: ``custom_id`` unique in the file, ``method`` POST, ``url``
the batch's ``endpoint``, a ``body`` genqueue can run, translated as the synchronous routes
translate theirs: OpenAI's defaults, ``model`` the base model or an adapter), and queues it
all as one bulk job of the caller's. A file with bad lines makes a ``failed`` batch whose
``errors`` name each line (from 1) and nothing is queued. Each request carries the
completion window as its deadline (``expires_in_s``): ``24h``, OpenAI's only value, or a
shorter ``<n>s|m|h|d`` (a genqueue extension).

The batch record is ``genq:batch:<id>`` (JSON) in the result Redis, listed newest first from
the sorted sets ``genq:batches`` (every batch) and ``genq:batches:by:<owner>``; all expire
after ``GENQ_RESULT_TTL_S``. Its status is read from the job on every read: ``in_progress``
while requests are open; past ``expires_at`` the rest are cancelled (``finalizing``, then
``expired``); ``POST /v1/batches/{id}/cancel`` cancels the rest (``cancelling``, then
``cancelled``). Once every request is final, the first read that sees it (one Redis
``SET NX`` lock; reads meanwhile answer ``finalizing``) writes the output file (succeeded
requests) and the error file (the others), both purpose ``batch_output``, lines in input
order, in OpenAI's documented format::

    {"id": "batch_req_<request id>", "custom_id": ..., "error": null,
     "response": {"status_code": 200, "request_id": <request id>, "body": <chat.completion>}}
    {"id": "batch_req_<request id>", "custom_id": ..., "response": null,
     "error": {"code": "prompt_too_long" | "batch_expired" | "batch_cancelled" | ..., "message": ...}}

``request_counts``: ``completed`` the succeeded requests, ``failed`` every other final one
(failed, cancelled, expired).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import WatchError

from worker.batchfile import Line, from_openai, json_error, strict_json
from worker.compat.chat import resolve_model, served
from worker.compat.shapes import chat_completion, text_completion
from worker.errors import IdempotencyConflict, InvalidRequest, ModelNotFound, NotFound, PromptTooLong

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
TERMINAL = ("failed", "completed", "expired", "cancelled")
MAX_REQUESTS = 200_000  # genqueue's bulk-job limit (OpenAI's is 50,000)
MAX_ERRORS = 1000  # per failed batch; a line-numbered error each
MAX_WINDOW_S = 30 * 24 * 3600
LOCK_S = 300  # finalization lock, refreshed while the files are written
RELEASE = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"""  # the finalization lock, only by its holder
SPOOL_BYTES = 8 * 1024 * 1024
WINDOW = re.compile(r"^([1-9][0-9]{0,7})([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
FIELDS = ("id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window",
          "status", "output_file_id", "error_file_id", "created_at", "in_progress_at",
          "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at", "request_counts", "metadata", "usage")
MESSAGES = {"batch_expired": "This request could not be executed before the completion window "
                             "expired.",
            "batch_cancelled": "This request was cancelled before it finished.",
            "batch_failed": "This request was not run: the batch failed."}


class CreateBatch(BaseModel):
    """The body of ``POST /v1/batches`` (OpenAI's fields)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=128)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None  # accepted; files live until deleted


def batch_key(batch_id: str) -> str:
    return f"genq:batch:{batch_id}"


def index_key(owner: str | None) -> str:
    return f"genq:batches:by:{owner}" if owner else "genq:batches"


def window_seconds(window: str) -> int:
    """Seconds of a completion window (``24h``; genqueue also takes ``<n>s|m|h|d``)."""
    match = WINDOW.match(window)
    seconds = int(match.group(1)) * UNIT_S[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidRequest(f"completion_window: {window[:20]!r} is not supported; use '24h' "
                             "(or a shorter '<n>s', '<n>m', '<n>h', '<n>d', at most 30d)")
    return seconds


class Translator:
    """OpenAI Batch lines as genqueue requests, as the synchronous routes take their bodies:
    OpenAI's defaults (``from_openai(..., openai_defaults=True)``: temperature 1; chat writes
    as many tokens as fit the context, legacy completions 16), ``body.model`` naming the base
    model or an adapter, bulk priority, the completion window as the deadline. What the fleet
    serves is read once per batch, so every pass over the file translates it alike."""

    def __init__(self, view, settings, window_s: int):
        self.settings, self.window_s = settings, window_s
        self.bases = served(view, settings)
        limits = [int(w["max_new_tokens_limit"]) for w in view.store.workers()
                  if isinstance(w.get("max_new_tokens_limit"), int)]
        self.cap = min(limits) if limits else settings.max_new_tokens_limit
        self.counter = view.counter.get()

    def __call__(self, line: dict[str, Any]) -> dict[str, Any]:
        request = from_openai(line, openai_defaults=True)
        model = line["body"].get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("body.model: must be a string")
        try:
            adapter = resolve_model(model, self.bases)
        except ModelNotFound as exc:
            raise InvalidRequest(f"body.model: {exc.message}") from None
        if adapter is not None:
            request["adapter"] = adapter
        if line.get("url") == ENDPOINTS[0] and "max_new_tokens" not in request:
            request["max_new_tokens"] = self._fit(request)
        return {**request, "priority": "bulk", "expires_in_s": self.window_s}

    def _fit(self, request: dict[str, Any]) -> int:
        """OpenAI's absent ``max_tokens``: the context left after the prompt (as the workers
        count it; the cap alone before a worker has published its tokenizer)."""
        if self.counter is None:
            return self.cap
        try:
            prompt = self.counter.count({**request, "max_new_tokens": 1})
        except InvalidRequest:
            raise
        except Exception:  # a template error: the worker reports it for this request alone
            return self.cap
        room = self.counter.context_length - prompt
        if room < 1:
            raise PromptTooLong(f"prompt has {prompt} tokens; it fills the context "
                                f"{self.counter.context_length}")
        return min(self.cap, room)


def _param(message: str, body: Any = None) -> str | None:
    """The OpenAI parameter an error message names first (``body.max_tokens`` for genqueue's
    ``max_new_tokens``)."""
    match = PARAM.match(message)
    if not match:
        return None
    name = match.group(1)
    if name.startswith(("body", "custom_id", "url", "method")):
        return name
    if name == "max_new_tokens":
        given = body if isinstance(body, dict) else {}
        name = "max_completion_tokens" if given.get("max_completion_tokens") is not None and \
            given.get("max_tokens") is None else "max_tokens"
    return f"body.{name}"


def _error(code: str, message: str, line: int | None, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


class Batches:
    """Batch records in Redis and the routes' logic (``view``: the caller's client)."""

    def __init__(self, client, settings, files):
        self.client, self.settings, self.files = client, settings, files
        self.redis = client.store.redis
        self._release = self.redis.register_script(RELEASE)
        self.ttl = settings.result_ttl_s

    # -- records ----------------------------------------------------------------------

    def _visible(self, view, record: dict[str, Any]) -> bool:
        return view.owner is None or view.admin or record.get("owner") == view.owner

    def load(self, view, batch_id: str) -> dict[str, Any]:
        raw = self.redis.get(batch_key(batch_id)) if len(batch_id) <= 128 else None
        record = json.loads(raw) if raw else None
        if record is None or not self._visible(view, record):
            raise NotFound(f"No batch found with id '{batch_id[:128]}'.")
        return record

    def save_new(self, record: dict[str, Any]) -> None:
        score = record["created_ns"] / 1e9
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(batch_key(record["id"]), json.dumps(record), ex=self.ttl)
        for key in {index_key(None), index_key(record.get("owner"))}:
            pipe.zadd(key, {record["id"]: score})
            pipe.expire(key, self.ttl)
        pipe.execute()

    def update(self, batch_id: str, change: Callable[[dict], dict | None]) -> dict[str, Any]:
        """Apply ``change`` to the stored record atomically (optimistic: WATCH and retry);
        ``change`` returns the new record, or None to leave it. The record as stored."""
        key = batch_key(batch_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise NotFound(f"No batch found with id '{batch_id}'.")
                    current = json.loads(raw)
                    new = change(current)
                    if new is None:
                        pipe.unwatch()
                        return current
                    pipe.multi()
                    pipe.set(key, json.dumps(new), keepttl=True)
                    pipe.execute()
                    return new
                except WatchError:
                    continue

    # -- creating ---------------------------------------------------------------------

    def create(self, view, body: CreateBatch) -> dict[str, Any]:
        window_s = window_seconds(body.completion_window)
        if body.metadata is not None and (len(body.metadata) > 16 or any(
                len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
            raise InvalidRequest("metadata: at most 16 pairs, keys up to 64 characters and "
                                 "values up to 512")
        info = self.files.get(body.input_file_id, view.owner, view.admin)
        if info.get("purpose") != "batch":
            raise InvalidRequest(f"input_file_id: file {body.input_file_id!r} has purpose "
                                 f"{info.get('purpose')!r}, not 'batch'")
        now_ns = time.time_ns()
        now = now_ns // 1_000_000_000
        record: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": body.endpoint,
            "model": None, "errors": None, "input_file_id": body.input_file_id,
            "completion_window": body.completion_window, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + window_s, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.metadata, "usage": None,
            # internal
            "owner": view.owner, "job_id": None, "ending": None, "created_ns": now_ns,
        }
        translate = Translator(view, self.settings, window_s)
        errors, total = self._check_file(view, body, translate)
        job_id = None
        if not errors:
            try:
                job_id = view.submit_stream(
                    lambda: self._requests(view, body, translate), priority="bulk")
            except (InvalidRequest, IdempotencyConflict) as exc:
                errors = _submit_errors(exc)
        if errors:
            record.update(status="failed", failed_at=int(time.time()),
                          errors={"object": "list", "data": errors[:MAX_ERRORS]})
        else:
            record.update(status="in_progress", in_progress_at=int(time.time()), job_id=job_id,
                          request_counts={"total": total, "completed": 0, "failed": 0})
            self.redis.hset(f"genq:job:{job_id}", "batch", record["id"])  # webhook events
        self.save_new(record)
        return self.refresh(record)

    def _lines(self, view, file_id: str) -> Iterator[tuple[int, Any, dict | None]]:
        """(line number, parsed line, or an error) of each non-blank line of the file."""
        with self.files.open(file_id, view.owner, view.admin) as f:
            for number, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield number, None, _error("invalid_json_line", "not UTF-8", number)
                    continue
                if not text.strip():
                    continue
                try:
                    yield number, json.loads(text, parse_constant=strict_json), None
                except json.JSONDecodeError as exc:
                    yield number, None, _error("invalid_json_line", json_error(exc), number)
                except RecursionError:
                    yield number, None, _error("invalid_json_line", "JSON nested too deeply",
                                               number)
                except ValueError as exc:
                    yield number, None, _error("invalid_json_line", str(exc), number)

    @staticmethod
    def _check_line(number: int, line: Any, endpoint: str, seen: set[str],
                    translate: Translator) -> tuple[dict | None, dict | None]:
        """(the genqueue request, None) or (None, the line's error)."""
        if not isinstance(line, dict):
            return None, _error("invalid_json_line", "a line must be a JSON object", number)
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return None, _error("missing_required_parameter",
                                "custom_id: a non-empty string is required", number, "custom_id")
        if custom_id in seen:
            return None, _error("duplicate_custom_id", f"custom_id {custom_id[:64]!r} is used by "
                                "an earlier line; custom_ids must be unique in the file",
                                number, "custom_id")
        seen.add(custom_id)
        extra = set(line) - {"custom_id", "method", "url", "body"}
        if extra:
            return None, _error("invalid_request", f"unknown field(s): {', '.join(sorted(extra))}",
                                number, sorted(extra)[0])
        if line.get("method") != "POST":
            return None, _error("invalid_request", "method: must be 'POST'", number, "method")
        if line.get("url") != endpoint:
            return None, _error("invalid_url", f"url: {str(line.get('url'))[:64]!r} does not "
                                f"match the batch's endpoint {endpoint!r}", number, "url")
        if not isinstance(line.get("body"), dict):
            return None, _error("invalid_request", "body: must be an object", number, "body")
        try:
            return translate(line), None
        except InvalidRequest as exc:
            code = "model_not_found" if exc.message.startswith("body.model:") else exc.code
            return None, _error(code, exc.message, number, _param(exc.message, line["body"]))

    def _check_file(self, view, body: CreateBatch, translate: Translator
                    ) -> tuple[list[dict], int]:
        """Every line's errors (schema, limits and prompt length as ``submit`` checks them)
        and the number of requests; keeps no request."""
        errors: list[dict] = []
        seen: set[str] = set()
        total = 0
        for number, line, error in self._lines(view, body.input_file_id):
            if error is None:
                request, error = self._check_line(number, line, body.endpoint, seen, translate)
                if error is None:
                    try:
                        view.validate(request)
                    except InvalidRequest as exc:
                        error = _error(exc.code, exc.message, number,
                                       _param(exc.message, line["body"]))
            total += 1
            if error is not None and len(errors) < MAX_ERRORS:
                errors.append(error)
        if not total:
            errors.append(_error("empty_file", "the input file has no requests", None,
                                 "input_file_id"))
        elif total > MAX_REQUESTS:
            errors.append(_error("too_many_tasks", f"{total} requests; a batch takes at most "
                                 f"{MAX_REQUESTS}", None, "input_file_id"))
        return errors, total

    def _requests(self, view, body: CreateBatch, translate: Translator) -> Iterator[Line]:
        """The file's requests as ``Line``s, for ``submit_stream`` (read again each time)."""
        seen: set[str] = set()
        for number, line, error in self._lines(view, body.input_file_id):
            request, error = (None, error) if error else self._check_line(
                number, line, body.endpoint, seen, translate)
            if error is not None:
                yield Line(number, error=error["message"])
            else:
                yield Line(number, request=request)

    # -- reading ----------------------------------------------------------------------

    def refresh(self, record: dict[str, Any], finalize: bool = True) -> dict[str, Any]:
        """The batch as it stands now: status and counts from its job; expiry applied; the
        files written once every request is final (unless ``finalize`` is False: then it
        reads ``finalizing``)."""
        if record["status"] in TERMINAL or record["job_id"] is None:
            return record
        try:
            job = self.client.store.job(record["job_id"])
        except NotFound:  # the job's records expired before the batch's
            return {**record, "status": "expired"}
        done = self._done(job)
        if not done and record.get("ending") is None and time.time() >= record["expires_at"]:
            record = self.update(record["id"], lambda cur: None if cur.get("ending") else {
                **cur, "ending": "expired"})
            if record["ending"] == "expired" and record["status"] not in TERMINAL:
                self.client.cancel_job(record["job_id"])
                job = self.client.store.job(record["job_id"])
                done = self._done(job)
        if done and record["status"] not in TERMINAL:
            if finalize:
                return self.finalize(record)
            return {**record, "status": "finalizing", "request_counts": _counts(job["counts"])}
        if record["status"] in TERMINAL:
            return record
        status = {"cancelled": "cancelling", "expired": "finalizing"}.get(
            record.get("ending") or "", "validating" if job["status"] == "validating"
            else "in_progress")
        if record["status"] == "finalizing":
            status = "finalizing"
        return {**record, "status": status, "request_counts": _counts(job["counts"])}

    @staticmethod
    def _done(job: dict[str, Any]) -> bool:
        counts = job["counts"]
        return job["status"] == "failed" or (
            job["status"] != "validating" and counts["queued"] == 0 and counts["running"] == 0)

    def cancel(self, view, batch_id: str) -> dict[str, Any]:
        record = self.load(view, batch_id)
        if record["status"] in ("failed", "completed", "expired") or record["job_id"] is None:
            raise InvalidRequest(f"Cannot cancel a batch with status '{record['status']}'.")
        if self.refresh(record, finalize=False)["status"] == "finalizing":
            return self.refresh(record)  # every request is final (or expired): nothing to cancel

        def mark(cur: dict) -> dict | None:
            if cur["status"] in (*TERMINAL, "finalizing") or cur.get("ending"):
                return None
            return {**cur, "ending": "cancelled", "cancelling_at": int(time.time())}

        record = self.update(batch_id, mark)
        if record.get("ending") == "cancelled" and record["status"] not in TERMINAL:
            self.client.cancel_job(record["job_id"])
            return {**self.refresh(record, finalize=False), "status": "cancelling"}
        return self.refresh(record)

    def list(self, view, after: str | None, limit: int) -> dict[str, Any]:
        key = index_key(None if view.owner is None or view.admin else view.owner)
        start = 0
        if after:
            rank = self.redis.zrevrank(key, after)
            if rank is None:
                return {"object": "list", "data": [], "first_id": None, "last_id": None,
                        "has_more": False}
            start = rank + 1
        found: list[dict[str, Any]] = []
        while len(found) <= limit:
            ids = self.redis.zrevrange(key, start, start + limit)
            if not ids:
                break
            start += len(ids)
            raws = self.redis.mget([batch_key(i) for i in ids])
            gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
            if gone:
                self.redis.zrem(key, *gone)
                start -= len(gone)
            found += [json.loads(raw) for raw in raws if raw is not None]
        data = [public(self.refresh(r, finalize=False)) for r in found[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(found) > limit}

    # -- finalizing -------------------------------------------------------------------

    def finalize(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write the output and error files once (a Redis ``SET NX`` lock; others answer
        ``finalizing``) and end the batch: completed, expired or cancelled."""
        batch_id = record["id"]
        lock, token = f"{batch_key(batch_id)}:lock", uuid.uuid4().hex
        if not self.redis.set(lock, token, nx=True, ex=LOCK_S):
            current = self.load_any(batch_id)
            return current if current["status"] in TERMINAL else {**current, "status": "finalizing"}
        try:
            record = self.update(batch_id, lambda cur: None if cur["status"] in TERMINAL else {
                **cur, "status": "finalizing", "finalizing_at": cur.get("finalizing_at")
                or int(time.time())})
            if record["status"] in TERMINAL:
                return record
            written = self._write_files(record, lambda: self.redis.expire(lock, LOCK_S))
            job = self.client.store.job(record["job_id"])

            def end(cur: dict) -> dict | None:
                if cur["status"] in TERMINAL:
                    return None
                now = int(time.time())
                status = {"cancelled": "cancelled", "expired": "expired"}.get(
                    cur.get("ending") or "", "failed" if job["status"] == "failed"
                    else "expired" if written["expired"] else "completed")
                errors = cur.get("errors")
                if job["status"] == "failed" and not errors:
                    errors = {"object": "list", "data": [_error(
                        "batch_failed", job.get("error") or "the batch failed", None)]}
                return {**cur, "status": status, f"{status}_at": now, "errors": errors,
                        "output_file_id": written["output_file_id"],
                        "error_file_id": written["error_file_id"],
                        "request_counts": written["request_counts"], "usage": written["usage"],
                        "model": written["model"]}

            return self.update(batch_id, end)
        finally:
            self._release(keys=[lock], args=[token])

    def load_any(self, batch_id: str) -> dict[str, Any]:
        raw = self.redis.get(batch_key(batch_id))
        if raw is None:
            raise NotFound(f"No batch found with id '{batch_id}'.")
        return json.loads(raw)

    def _write_files(self, record: dict[str, Any], keep_lock: Callable[[], Any]) -> dict:
        """One pass over the job's results, in input order, into the two files."""
        shape = chat_completion if record["endpoint"] == "/v1/chat/completions" else text_completion
        expiring = record.get("ending") == "expired"
        outputs = [tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) for _ in range(2)]
        counts = {"total": 0, "completed": 0, "failed": 0}
        usage = {"input_tokens": 0, "output_tokens": 0}
        model, expired = None, 0
        now = int(time.time())
        try:
            for n, res in enumerate(self.client.job_results(record["job_id"])):
                if n % 1000 == 999:
                    keep_lock()
                rid = res["id"]
                line: dict[str, Any] = {"id": f"batch_req_{rid}", "custom_id": res.get("custom_id")}
                counts["total"] += 1
                if res["status"] == "succeeded":
                    model = model or res.get("model")
                    body = shape(res, res.get("model") or self.settings.model, created=now)
                    line.update(response={"status_code": 200, "request_id": rid, "body": body},
                                error=None)
                    counts["completed"] += 1
                    usage["input_tokens"] += body["usage"]["prompt_tokens"]
                    usage["output_tokens"] += body["usage"]["completion_tokens"]
                    out = outputs[0]
                else:
                    if res["status"] == "failed":
                        err = res.get("error") or {}
                        code = err.get("code") or "internal"
                        message = err.get("message") or "the request failed"
                    else:
                        code = ("batch_expired" if res["status"] == "expired" or expiring
                                else "batch_cancelled" if res["status"] == "cancelled"
                                else "batch_failed")
                        expired += code == "batch_expired"
                        message = MESSAGES[code]
                    line.update(response=None, error={"code": code, "message": message})
                    counts["failed"] += 1
                    out = outputs[1]
                out.write((json.dumps(line, ensure_ascii=False) + "\n").encode())
            ids = []
            for out, kind in zip(outputs, ("output", "error"), strict=True):
                if not out.tell():
                    ids.append(None)
                    continue
                out.seek(0)
                ids.append(self.files.create(iter(lambda f=out: f.read(1024 * 1024), b""),
                                           filename=f"{record['id']}_{kind}.jsonl",
                                           purpose="batch_output", owner=record.get("owner"))["id"])
        finally:
            for out in outputs:
                out.close()
        return {"output_file_id": ids[0], "error_file_id": ids[1], "request_counts": counts,
                "expired": expired, "model": model,
                "usage": {"input_tokens": usage["input_tokens"],
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": usage["output_tokens"],
                          "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": usage["input_tokens"] + usage["output_tokens"]}}


def _counts(counts: dict[str, int]) -> dict[str, int]:
    """OpenAI's ``request_counts`` from a job's counts."""
    return {"total": counts["total"], "completed": counts["succeeded"],
            "failed": counts["failed"] + counts["cancelled"] + counts["expired"]}


def _submit_errors(exc: InvalidRequest | IdempotencyConflict) -> list[dict]:
    """A batch's errors from ``submit_stream``'s refusal ("N bad request(s): line 2: ...;
    line 5: ..."): one per line where the message names it."""
    _, _, listed = exc.message.partition(": ")
    parts = re.split(r"(?:^|; )line (\d+): ", listed)
    if len(parts) < 3:
        return [_error(exc.code, exc.message, None, _param(exc.message))]
    return [_error(exc.code, parts[i + 1].removesuffix(")").strip(), int(parts[i]),
                   _param(parts[i + 1]))
            for i in range(1, len(parts) - 1, 2)]


def public(record: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI batch object (drops internal bookkeeping)."""
    return {k: record.get(k) for k in FIELDS}


def router(client, settings, files) -> APIRouter:
    """The routes of this part of the OpenAI surface: ``/v1/batches``."""
    api = APIRouter(tags=["openai"])
    batches = Batches(client, settings, files)

    @api.post("/v1/batches")
    def create_batch(body: CreateBatch, request: Request) -> dict:
        """Create a batch from an uploaded file of OpenAI Batch lines (purpose ``batch``)."""
        return public(batches.create(request.state.client, body))

    @api.get("/v1/batches")
    def list_batches(request: Request, after: str | None = Query(None, max_length=128),
                     limit: int = Query(20, ge=1, le=100)) -> dict:
        """The caller's batches, newest first (admins: every batch)."""
        return batches.list(request.state.client, after, limit)

    @api.get("/v1/batches/{batch_id}")
    def retrieve_batch(batch_id: str, request: Request) -> dict:
        """The batch as it stands (its files are written once every request is final)."""
        return public(batches.refresh(batches.load(request.state.client, batch_id)))

    @api.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str, request: Request) -> dict:
        """Cancel the batch's unfinished requests: ``cancelling``, then ``cancelled``."""
        return public(batches.cancel(request.state.client, batch_id))

    return api
