"""The engine: a list of requests in, one result per request out, in order.

No queue here. ``Engine.generate`` validates each request (a bad one fails alone), tokenizes,
plans length-sorted sub-batches per adapter, runs each as one left-padded, attention-masked
``generate`` call with a pad distinct from EOS, slices every row after the padded prompt and
``batch_decode``s it. An out-of-memory batch is split in halves down to single rows.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from worker.engine.batching import Row, pad_fraction, plan_batches
from worker.engine.loading import load_adapters, load_model, select_adapter
from worker.engine.padding import PadChoice, apply_pad_token, eos_ids
from worker.engine.prompts import encode
from worker.engine.sampling import RowSampler
from worker.engine.stopping import CancelCheck, RowStopper, cut_at_stop
from worker.errors import GenqError, InvalidRequest, OutOfMemory, PromptTooLong
from worker.schema import GenerationRequest, validate_request

log = structlog.get_logger(__name__)

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, MemoryError)


@dataclass
class _Pending:
    """A valid request on its way through the engine."""

    id: str
    request: GenerationRequest
    prompt_ids: list[int]


class Engine:
    """A loaded model plus the batching rules. Build one with ``load_engine``."""

    def __init__(self, model, tokenizer, *, backend: str, model_name: str, dtype: str,
                 pad: PadChoice, adapters: dict[str, str] | None = None,
                 max_batch_size: int = 32, max_batch_tokens: int = 32768,
                 max_prompt_tokens: int | None = None, max_new_tokens_limit: int = 2048,
                 worker_name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend
        self.model_name = model_name
        self.dtype = dtype
        self.pad = pad
        self.adapters = dict(adapters or {})
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.worker_name = worker_name
        context = getattr(model.config, "max_position_embeddings", None) or 4096
        self.context_length = int(context)
        self.max_prompt_tokens = max_prompt_tokens
        self.eos_ids = eos_ids(tokenizer, model.config) | _generation_eos(model)
        self.device = next(model.parameters()).device
        self.padding_side = "left"  # set on every batch: Unsloth's for_training flips it
        self.oom_splits = 0  # batches split after out-of-memory (exported by workers)

    # -- public API -------------------------------------------------------------------

    def generate(self, requests: list[dict[str, Any]], *,
                 is_cancelled: CancelCheck | None = None) -> list[dict[str, Any]]:
        """Run every request; return results in the same order (``succeeded`` or ``failed``).

        ``is_cancelled`` (request ids -> flags) is polled every few decode steps; a
        cancelled row stops with ``finish_reason: cancelled`` and the text so far.
        """
        started = time.perf_counter()
        results: list[dict[str, Any] | None] = [None] * len(requests)
        pending: dict[int, _Pending] = {}
        checked: list[tuple[int, str, GenerationRequest]] = []
        for i, raw in enumerate(requests):
            request_id = str(raw.get("id") or uuid.uuid4()) if isinstance(raw, dict) else str(uuid.uuid4())
            try:
                checked.append((i, request_id, self._validate(raw)))
            except GenqError as exc:
                results[i] = self._failed(request_id, raw, exc)
        if checked:
            for (i, request_id, request), ids in zip(
                checked, self._encode([c[2] for c in checked]), strict=True
            ):
                try:
                    if isinstance(ids, GenqError):
                        raise ids
                    self._check_length(len(ids), request.max_new_tokens)
                except GenqError as exc:
                    results[i] = self._failed(request_id, request.model_dump(), exc)
                    continue
                pending[i] = _Pending(request_id, request, ids)

        rows = [Row(i, len(p.prompt_ids), p.request.max_new_tokens, p.request.adapter)
                for i, p in pending.items()]
        for batch in plan_batches(rows, self.max_batch_size, self.max_batch_tokens):
            items = [(row.index, pending[row.index]) for row in batch]
            for index, result in self._run_splitting(items, is_cancelled, started):
                results[index] = result
        return results  # type: ignore[return-value]

    def prepare(self, request: dict[str, Any]) -> int:
        """Check one request as ``generate`` will; its prompt token count (no padding).

        Raises the ``GenqError`` that ``generate`` would store for it.
        """
        checked = self._validate(request)
        ids = self._encode([checked])[0]
        if isinstance(ids, GenqError):
            raise ids
        self._check_length(len(ids), checked.max_new_tokens)
        return len(ids)

    # -- internals --------------------------------------------------------------------

    def _validate(self, raw: Any) -> GenerationRequest:
        body = {k: v for k, v in raw.items() if k != "id"} if isinstance(raw, dict) else raw
        request = validate_request(body, max_new_tokens_limit=self.max_new_tokens_limit)
        if request.adapter is not None and request.adapter not in self.adapters:
            raise InvalidRequest(f"adapter: unknown adapter {request.adapter!r}; "
                                 f"configured: {sorted(self.adapters) or 'none'}")
        return request

    def _encode(self, requests: list[GenerationRequest]) -> list[list[int] | InvalidRequest]:
        """Token ids per request; a request the template or tokenizer rejects gets an error
        instead, and never fails its batch-mates."""
        try:
            return encode(self.tokenizer, requests)
        except Exception:
            return [self._encode_one(r) for r in requests]

    def _encode_one(self, request: GenerationRequest) -> list[int] | InvalidRequest:
        try:
            return encode(self.tokenizer, [request])[0]
        except Exception as exc:
            return InvalidRequest(f"the prompt cannot be rendered: {type(exc).__name__}: {exc}")

    def _check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens == 0:
            raise PromptTooLong("the prompt renders to no tokens")
        if self.max_prompt_tokens and prompt_tokens > self.max_prompt_tokens:
            raise PromptTooLong(
                f"prompt has {prompt_tokens} tokens; the limit is {self.max_prompt_tokens}")
        if prompt_tokens + max_new_tokens > self.context_length:
            raise PromptTooLong(
                f"prompt has {prompt_tokens} tokens + max_new_tokens {max_new_tokens} > "
                f"context {self.context_length}")

    def _run_splitting(self, items, is_cancelled, started):
        """Run a sub-batch; on out-of-memory split it in halves, down to single rows."""
        try:
            return self._run_batch(items, is_cancelled, started)
        except OOM_ERRORS as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(items) == 1:
                index, p = items[0]
                log.warning("oom_single_row", request_id=p.id)
                err = OutOfMemory(f"out of memory on a single row: {exc}")
                return [(index, self._failed(p.id, p.request.model_dump(), err))]
            half = len(items) // 2
            self.oom_splits += 1
            log.warning("oom_split", batch_size=len(items), halves=[half, len(items) - half])
            return (self._run_splitting(items[:half], is_cancelled, started)
                    + self._run_splitting(items[half:], is_cancelled, started))

    def _run_batch(self, items, is_cancelled, started):
        requests = [p.request for _, p in items]
        ids = [p.id for _, p in items]
        adapter = requests[0].adapter
        t0 = time.perf_counter()
        self.tokenizer.padding_side = self.padding_side
        enc = self.tokenizer.pad({"input_ids": [p.prompt_ids for _, p in items]},
                                 padding=True, padding_side=self.padding_side, return_tensors="pt")
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        prompt_len = input_ids.shape[1]
        stopper = RowStopper(
            prompt_len=prompt_len,
            max_new_tokens=[r.max_new_tokens for r in requests],
            eos_ids=self.eos_ids,
            stops=[r.stop for r in requests],
            tokenizer=self.tokenizer,
            request_ids=ids,
            is_cancelled=is_cancelled,
        )
        sampler = RowSampler.for_requests(requests)
        select_adapter(self.model, adapter, bool(self.adapters))
        with torch.inference_mode():
            out = self._generate_tensors(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pad_token_id=self.pad.token_id,
                eos_token_id=sorted(self.eos_ids),
                max_new_tokens=max(r.max_new_tokens for r in requests),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                stopping_criteria=StoppingCriteriaList([stopper]),
                logits_processor=LogitsProcessorList([sampler] if sampler else []),
            )
        texts = self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False)
        t1 = time.perf_counter()
        lengths = [len(p.prompt_ids) for _, p in items]
        batch = {"size": len(items), "pad_fraction": round(pad_fraction(lengths), 4)}
        generate_ms = (t1 - t0) * 1000
        log.debug("batch_generated", batch_size=len(items), pad_fraction=batch["pad_fraction"],
                 prompt_len=prompt_len, adapter=adapter, generate_ms=round(generate_ms, 1))
        results = []
        for row, ((index, p), text) in enumerate(zip(items, texts, strict=True)):
            reason = stopper.reasons[row] or "length"
            text, cut = cut_at_stop(text, p.request.stop)
            if cut:
                reason = "stop_sequence"
            completion = int(stopper.lengths[row]) or int(out.shape[1] - prompt_len)
            results.append((index, {
                **self._base_result(p.id, p.request.model_dump()),
                "status": "cancelled" if reason == "cancelled" else "succeeded",
                "text": text,
                "finish_reason": reason,
                "usage": {"prompt_tokens": len(p.prompt_ids), "completion_tokens": completion},
                "timings": {
                    "queued_ms": round((t0 - started) * 1000, 1),
                    "generate_ms": round(generate_ms, 1),
                    "total_ms": round((t1 - started) * 1000, 1),
                },
                "batch": batch,
            }))
        return results

    def _generate_tensors(self, **kwargs) -> torch.Tensor:
        """One ``model.generate`` call (the seam tests use to inject failures)."""
        return self.model.generate(**kwargs)

    def _base_result(self, request_id: str, body: Any) -> dict[str, Any]:
        body = body if isinstance(body, dict) else {}
        adapter = body.get("adapter")
        return {
            "id": request_id,
            "status": "failed",
            "custom_id": body.get("custom_id") if isinstance(body.get("custom_id"), str) else None,
            "text": None,
            "finish_reason": None,
            "usage": None,
            "timings": None,
            "batch": None,
            "worker": self.worker_name,
            "model": self.model_name,
            "adapter": adapter if isinstance(adapter, str) else None,
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else None,
            "error": None,
        }

    def _failed(self, request_id: str, body: Any, exc: GenqError) -> dict[str, Any]:
        log.info("request_failed", request_id=request_id, code=exc.code, message=exc.message)
        return {**self._base_result(request_id, body), "error": exc.as_error()}


def _generation_eos(model) -> set[int]:
    """EOS ids the generation config stops on (chat models list their turn-end token)."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(value, int):
        return {value}
    return {v for v in value or [] if isinstance(v, int)}


def load_engine(model: str = "demo", backend: str = "auto", dtype: str | None = None,
                adapters: dict[str, str] | None = None, **settings: Any) -> Engine:
    """Load a model with its tokenizer rules applied, ready for ``Engine.generate``.

    ``settings`` are any of the ``GENQ_`` settings in lower case (``max_batch_size``,
    ``max_batch_tokens``, ``max_prompt_tokens``, ``max_new_tokens_limit``, ``cache_dir``,
    ``load_in_4bit``); the rest default from the environment.
    """
    from worker.ops.settings import Settings

    worker_name = settings.pop("worker_name", None)
    config = Settings(model=model, backend=backend, dtype=dtype, adapters=adapters or {}, **settings)
    loaded = load_model(config.model, config.backend, config.dtype, Path(config.cache_dir),
                        load_in_4bit=config.load_in_4bit)
    pad = apply_pad_token(loaded.tokenizer, loaded.model)
    log.info("pad_token_chosen", token=pad.token, token_id=pad.token_id, reason=pad.reason,
             eos_ids=sorted(eos_ids(loaded.tokenizer, loaded.model.config)))
    load_adapters(loaded.model, config.adapters)
    return Engine(
        loaded.model, loaded.tokenizer, backend=loaded.backend, model_name=loaded.model_name,
        dtype=loaded.dtype, pad=pad, adapters=config.adapters,
        max_batch_size=config.max_batch_size, max_batch_tokens=config.max_batch_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        max_new_tokens_limit=config.max_new_tokens_limit, worker_name=worker_name,
    )
